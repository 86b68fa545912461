"""A first result with real weights: SmolLM2-135M on GSM8K, zero-shot, CoT SFT, and CODI + SIM-CoT
and Coconut + SIM-CoT continued from the CoT weights.

    make smollm2                                   # models/smollm2-135m, once (pipeline.import_gguf)
    python -m experiments.real_model --out runs/smollm2 [--cot-steps 150] [--latent-steps 60] [--eval-limit 200]

Every run goes through the real pipeline with the recipes ``configs/smollm2-135m-*.yaml``
(``pipeline.train`` under DeepSpeed ZeRO-3 on ``--nproc`` ranks, merge, evaluate):

1. data: the model's tokenizer with the latent tokens, shards of GSM8k-Aug's 3k train subset and
   its valid split in the Coconut and the CODI templates, cut at the 95th percentile of the train
   lengths (the longest 5 % of problems left out), and GSM8K test uncut;
2. zero-shot: the pretrained weights (one step at lr 0 writes the checkpoint merge reads);
3. CoT: full fine-tuning, ``--cot-steps``;
4. CODI + SIM-CoT (LoRA) and Coconut + SIM-CoT (full), ``--latent-steps`` each, from the CoT weights;
5. each evaluated on the first ``--eval-limit`` problems of GSM8K test (0: all 1,319), both metrics.

Re-running resumes (``experiments.jobs``: finished jobs with unchanged commands are kept). Results:
``OUT/results.md`` and each run's ``OUT/<run>/eval/report.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from common.cli import run_cli
from data_prep.batch import record_tokens
from data_prep.build import BuildOptions, run_build
from data_prep.summary import verify_shards
from data_prep.templates import Templates
from data_prep.tokenizer import build_tokenizer
from experiments.demo import merge_eval_commands, train_command
from experiments.jobs import Job, run_jobs
from experiments.sweep_report import EVAL_SET, run_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
TEMPLATES = {"coconut": Templates(), "codi": Templates("", " ", "The answer is: ")}
RUNS = {  # run -> (recipe, templates, what it is)
    "zero-shot": ("cot", "coconut", "pretrained weights, no training"),
    "cot": ("cot", "coconut", "explicit-CoT SFT, full fine-tuning"),
    "codi-simcot": ("codi-simcot", "codi", "CODI + SIM-CoT, LoRA r128, from the CoT weights"),
    "coconut-simcot": ("coconut-simcot", "coconut", "Coconut + SIM-CoT, full fine-tuning, from the CoT weights"),
}


@dataclass(frozen=True)
class Study:
    out: str
    model: str
    cot_steps: int = 150
    latent_steps: int = 60
    batch: int = 8                  # global batch of every run
    nproc: int = 2
    eval_limit: int = 200
    percentile: float = 95.0

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def shards(self, templates: str, split: str = "train") -> str:
        return os.path.join(self.out, "data", f"{templates}-{'test' if split == 'test' else 'train'}")


def build_once(opts: BuildOptions) -> str:
    """Shards, reused when a verified set is already there (a resumed study)."""
    if os.path.isfile(os.path.join(opts.out, "manifest.json")) and not verify_shards(opts.out):
        return opts.out
    run_build(opts, log=lambda line: None)
    return opts.out


def length_percentile(shards: str, percentile: float) -> int:
    """The ``percentile``-th train length in tokens (question + steps + answer + EOS)."""
    import numpy as np

    from data_prep import load_shards

    train = load_shards(shards).split("train")
    lengths = [record_tokens(q, s, a) for q, s, a in zip(train["question_ids"], train["step_ids"], train["answer_ids"])]
    return int(np.percentile(lengths, percentile))


def prepare(study: Study, data: str) -> int:
    """Tokenizer and shards for both templates; returns the length cut."""
    tok = os.path.join(study.out, "data", "tokenizer")
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        build_tokenizer([], 0, study.model, tok)
    aug = os.path.join(data, "gsm8k_aug")
    train_sources = [f"gsm8k-aug:{aug}/train_first3000.txt@train", f"gsm8k-aug:{aug}/valid.txt"]
    cut = None
    for name, templates in TEMPLATES.items():
        uncut = build_once(BuildOptions([*train_sources, f"gsm8k:{data}/gsm8k/test.jsonl"], tok,
                                        study.shards(name, "test"), templates=templates, overwrite=True))
        cut = cut or length_percentile(uncut, study.percentile)
        build_once(BuildOptions(train_sources, tok, study.shards(name), max_length=cut, templates=templates,
                                overwrite=True))
    return cut


def jobs_for(study: Study) -> list[Job]:
    cot_ckpt = os.path.join(study.run_dir("cot"), "checkpoints")
    overrides = {
        "zero-shot": ["train.lr=0", "train.max_steps=1", "train.validate=false"],
        "cot": [f"train.max_steps={study.cot_steps}"],
        # the step decoders start from the CoT weights, as the recorded study did (the reference starts
        # them from the raw pretrained model: drop method.decoder_init=base to match it)
        "codi-simcot": [f"train.max_steps={study.latent_steps}", f"checkpoint.init_from={cot_ckpt}",
                        "method.decoder_init=base"],
        # the curriculum in full: stages 1-3, then every step latent, a quarter of the steps each
        "coconut-simcot": [f"train.steps_per_epoch={max(1, study.latent_steps // 4)}", "train.epochs=4",
                           f"train.max_steps={study.latent_steps}", f"checkpoint.init_from={cot_ckpt}",
                           "method.decoder_init=base"],
    }
    jobs = []
    for name, (recipe, templates, _) in RUNS.items():
        config = os.path.join(REPO, "configs", f"smollm2-135m-{recipe}.yaml")
        command = train_command(config, study.shards(templates), study.out, name, study.nproc,
                                [f"model.name_or_path={study.model}", f"train.global_batch_size={study.batch}",
                                 "checkpoint.every_steps=0", *overrides[name]])
        after = ["train-cot"] if "checkpoint.init_from" in " ".join(overrides[name]) else []
        jobs.append(Job(f"train-{name}", [command], after, [study.run_dir(name)]))
    for name, (_, templates, _) in RUNS.items():
        max_new = 160 if name in ("zero-shot", "cot") else 48          # a whole chain, or an answer
        jobs.append(Job(f"eval-{name}", merge_eval_commands(study.run_dir(name),
                                                            f"{EVAL_SET}={study.shards(templates, 'test')}",
                                                            study.eval_limit, max_new),
                        [f"train-{name}"], [os.path.join(study.run_dir(name), sub) for sub in ("merged", "eval")]))
    return jobs


def results_table(study: Study, cut: int) -> str:
    rows = [run_result(study, name) for name in RUNS]
    n, seconds = rows[0]["n"], sum(row["seconds"] for row in rows)
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32) on the first {n} problems of GSM8K test; "
             f"train: GSM8k-Aug 3k subset cut at {cut} tokens ({study.percentile:g}th percentile), global batch "
             f"{study.batch}, {study.nproc} ZeRO-3 CPU ranks; {seconds / 3600:.1f} h of jobs in all.", "",
             "| run | what | optimizer steps | latents | accuracy (`#### a`) | accuracy (last number) | "
             "tokens generated | train + eval time |", "|---|---|---|---|---|---|---|---|"]
    for name, row in zip(RUNS, rows):
        steps = 0 if name == "zero-shot" else row["steps"]
        lines.append(f"| {name} | {RUNS[name][2]} | {steps} | {row['n_latents']} | {100 * row['accuracy']:.1f}% | "
                     f"{100 * row['accuracy_number']:.1f}% | {row['mean_tokens']:.1f} | "
                     f"{row['seconds'] / 60:.0f} min |")
    with open(os.path.join(study.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"cut": cut, "study": dataclasses.asdict(study), "runs": dict(zip(RUNS, rows))}, handle, indent=1)
    table = "\n".join(lines)
    with open(os.path.join(study.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return table


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.real_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2", help="study directory (default runs/smollm2)")
    parser.add_argument("--model", default=os.path.join(REPO, "models", "smollm2-135m"),
                        help="the model directory (default models/smollm2-135m, from `make smollm2`)")
    parser.add_argument("--data", default=SHARED, help="folder with gsm8k/ and gsm8k_aug/ (default ../shared/data)")
    parser.add_argument("--cot-steps", type=int, default=150, help="optimizer steps of the CoT SFT")
    parser.add_argument("--latent-steps", type=int, default=60, help="optimizer steps of each latent run")
    parser.add_argument("--batch", type=int, default=8, help="global batch of every run")
    parser.add_argument("--nproc", type=int, default=2, help="ZeRO-3 ranks per run")
    parser.add_argument("--eval-limit", type=int, default=200, help="GSM8K test problems (0: all 1,319)")
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path, what in ((args.model, "run `make smollm2` first"), (args.data, "give --data")):
        if not os.path.isdir(path):
            parser.error(f"{path}: no such directory; {what}")
    study = Study(os.path.abspath(args.out), os.path.abspath(args.model), args.cot_steps, args.latent_steps,
                  args.batch, args.nproc, args.eval_limit)
    cut = prepare(study, args.data)
    print(f"shards in {study.out}/data (train cut at {cut} tokens)", flush=True)
    # DeepSpeed picks CUDA where it exists; on a CPU box it must be told (DS_ACCELERATOR=cpu)
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    run_jobs(jobs_for(study), study.out, lanes=1, threads=1, cwd=REPO, env=env)
    print("\n" + results_table(study, cut), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
