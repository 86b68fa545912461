"""The embedded default, end to end on this CPU: ``make demo`` or ``python -m experiments.demo --out runs/demo``.

Runs every stage that exists, in data-flow order, and says what each produced:
synthetic GSM-style problems -> SentencePiece tokenizer -> verified shards -> a tiny LLaMA trained
with explicit CoT under DeepSpeed ZeRO-3 on 2 CPU ranks -> Coconut + SIM-CoT continued from it ->
each run merged into a Hugging Face model -> evaluated on the synthetic test split (reports with
plots under each run's eval/). The table at the end is read from the runs' own metrics and
reports, never fixed: if a method does badly, it says so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from data_prep.build import BuildOptions, run_build
from data_prep.summary import inspect_shards, verify_shards
from data_prep.synth import SynthConfig, generate_splits, write_splits
from data_prep.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT_STAGES, C_THOUGHT = 3, 2   # Coconut + SIM-CoT ends with every step latent: 6 latents (2-4 steps a problem)


def prepare_data(out: str, n_train: int, seed: int, task: SynthConfig | None = None, n_valid: int = 200,
                 log=print) -> str:
    """Synthetic problems, their SentencePiece tokenizer and verified shards under ``out/data``
    (the demo's, the sweep's and benchmark P10's data) -> the shard directory."""
    data = os.path.join(out, "data")
    log(f"[1/5] synthetic problems -> {data}/synth", flush=True)
    splits = generate_splits({"train": n_train, "valid": n_valid, "test": 500}, seed, task or SynthConfig())
    paths = write_splits(os.path.join(data, "synth"), splits)
    log(f"[2/5] SentencePiece tokenizer + shards -> {data}/shards", flush=True)
    build_tokenizer([paths["train"]], 512, None, os.path.join(data, "tokenizer"))
    shards = os.path.join(data, "shards")
    run_build(BuildOptions([f"gsm8k-aug:{paths[s]}" for s in ("train", "valid", "test")],
                           os.path.join(data, "tokenizer"), shards, shards=2, overwrite=True), log=log)
    problems = verify_shards(shards)
    if problems:
        raise SystemExit("shard verification failed: " + "; ".join(problems))
    log(inspect_shards(shards, examples=1).split("\n[")[0], flush=True)
    return shards


def train_command(config: str, shards: str, runs_dir: str, name: str, nproc: int, overrides: list[str]) -> list[str]:
    """``pipeline.train`` on ``nproc`` local ranks (torchrun), as the demo and the sweep run it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pipeline.train", "--config", config, f"data={shards}", f"runs_dir={runs_dir}", f"name={name}",
            *overrides]


def merge_eval_commands(run_dir: str, eval_set: str, limit: int, max_new_tokens: int = 80) -> list[list[str]]:
    """Merge a run's latest checkpoint, then evaluate the merged model on ``eval_set`` (NAME=DIR)."""
    return [[sys.executable, "-m", "pipeline.merge", "--run", run_dir],
            [sys.executable, "-m", "pipeline.evaluate", "--model", os.path.join(run_dir, "merged"), "--set", eval_set,
             "--split", "test", "--max-new-tokens", str(max_new_tokens), "--limit", str(limit)]]


def train(out: str, shards: str, name: str, overrides: list[str], nproc: int) -> str:
    command = train_command(os.path.join(REPO, "configs", "tiny-cpu.yaml"), shards, out, name, nproc, overrides)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, env=env, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"training {name} failed (exit {result.returncode}); see the output above")
    return os.path.join(out, name)


def merge_and_evaluate(run_dir: str, shards: str, limit: int) -> None:
    for command in merge_eval_commands(run_dir, f"synth={shards}", limit):
        result = subprocess.run(command, cwd=REPO)
        if result.returncode:
            raise SystemExit(f"{command[2]} failed for {run_dir} (exit {result.returncode})")


def summary(runs: dict[str, str]) -> str:
    rows = ["| run | steps | final train loss | valid loss | train tokens/s | test accuracy | tokens generated | "
            "problems/s |", "|---|---|---|---|---|---|---|---|"]
    for name, run_dir in runs.items():
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
        train = [m for m in metrics if "loss/total" in m]
        valid = [m["valid/total"] for m in metrics if "valid/total" in m]
        speed = sorted(m["throughput/tokens_per_s"] for m in train)[len(train) // 2]
        with open(os.path.join(run_dir, "eval", "report.json"), encoding="utf-8") as handle:
            test = json.load(handle)["sets"]["synth"]
        rows.append(f"| {name} | {train[-1]['step']} | {train[-1]['loss/total']:.3f} | "
                    f"{valid[-1] if valid else float('nan'):.3f} | {speed:,.0f} | {100 * test['accuracy_hash']:.1f}% "
                    f"of {test['n']} | {test['mean_tokens']:.1f} | {test['problems_per_s']:.1f} |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    parser.add_argument("--train", type=int, default=20000, help="synthetic training problems")
    parser.add_argument("--valid", type=int, default=200, help="synthetic valid problems (validated every epoch)")
    parser.add_argument("--cot-steps", type=int, default=1000, help="optimizer steps of the CoT run")
    parser.add_argument("--stage-steps", type=int, default=200, help="Coconut+SIM-CoT steps at each curriculum "
                        f"stage 1-{LATENT_STAGES} (default 200)")
    parser.add_argument("--final-steps", type=int, default=800, help="Coconut+SIM-CoT steps with every step latent "
                        "(default 800)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks (DeepSpeed ZeRO-3, gloo)")
    parser.add_argument("--eval-limit", type=int, default=500, help="test problems evaluated per run")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    for name in ("cot", "coconut-simcot"):       # the demo always starts fresh
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    shards = prepare_data(out, args.train, args.seed, n_valid=args.valid)
    print(f"[3/5] explicit CoT, {args.cot_steps} steps on {args.nproc} ranks", flush=True)
    runs = {"cot": train(out, shards, "cot", [f"train.max_steps={args.cot_steps}", "train.epochs=100"], args.nproc)}
    stage, final = args.stage_steps, args.final_steps
    print(f"[4/5] Coconut + SIM-CoT from the CoT weights: stages 1-{LATENT_STAGES} ({C_THOUGHT} latents per replaced "
          f"step, {stage} steps each), then {LATENT_STAGES * C_THOUGHT} latents for every step ({final} steps)",
          flush=True)
    runs["coconut-simcot"] = train(out, shards, "coconut-simcot", [
        "method.name=coconut", "method.simcot=true", "method.decoder_init=base",   # a tiny random model has no
        f"method.c_thought={C_THOUGHT}", f"method.max_latent_stage={LATENT_STAGES}",  # pretrained decoder to start from
        # an epoch of `stage` steps per stage; epochs past the last stage all put every step latent
        "curriculum.start_stage=1", f"train.steps_per_epoch={stage}",
        f"train.epochs={LATENT_STAGES - (-final // stage)}", f"train.max_steps={LATENT_STAGES * stage + final}",
        "train.lr=1e-3",
        f"checkpoint.init_from={os.path.join(runs['cot'], 'checkpoints')}"], args.nproc)
    print("[5/5] merge each run and evaluate it on the synthetic test split", flush=True)
    for run_dir in runs.values():
        merge_and_evaluate(run_dir, shards, args.eval_limit)
    print("\n" + summary(runs))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; runs in {out} "
          f"(TensorBoard: tensorboard --logdir {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
