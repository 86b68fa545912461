"""Toy-scale reproduction of SIM-CoT's latent-scaling result, on this CPU.

    make sweep                                  # or: python -m experiments.sweep --out runs/sweep
    python -m experiments.sweep --out runs/sweep --points 1,2,4,6,8 --stage-steps 200 --final-steps 300

The paper (SIM-CoT, its latent-scaling figure): as Coconut gets more latents (2 per step, 1..8 steps, up to
16), its accuracy drops while Coconut + SIM-CoT holds. Here, on the synthetic task with the tiny
LLaMA, every run goes through the real pipeline (pipeline.train under DeepSpeed ZeRO-3, merge,
evaluate):

1. references: explicit CoT and No-CoT, ``--cot-steps`` each;
2. two curriculum chains from the CoT weights, Coconut and Coconut + SIM-CoT: stage s replaces
   the first s steps by ``c`` latents each, ``--stage-steps`` optimizer steps per stage, up to the
   largest point;
3. for each point n and each method: the run with ``max_latent_stage = n`` is the chain up to
   stage n (identical by construction) followed by its final stage, every step latent with
   ``n * c`` latents: started from the chain's stage-n checkpoint, ``--final-steps`` steps;
4. merge and evaluate every reference and final run on the test split (accuracy, tokens,
   latent geometry: mean pairwise distance between latents, distance to the vocabulary centre).

Both methods see the same seeds, data order and step budgets at every point. Results:
``OUT/results.md`` (table), ``OUT/results.json``, ``OUT/accuracy_vs_latents.png``,
``OUT/geometry_vs_latents.png``; each run's report under ``OUT/<run>/eval/``. Jobs run in
``--lanes`` parallel single-thread processes. Re-running resumes: finished jobs whose commands
are unchanged are kept, so an interrupted sweep goes on and ``--equal-budget`` added to a finished
one trains only its control runs (``--fresh`` starts over).
Bigger: more ``--train`` problems, ``--max-steps`` of the task, ``--stage-steps``/``--final-steps``,
or a recipe with a larger model via ``--config`` and more ``--nproc`` ranks per run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch

from experiments.demo import merge_eval_commands, prepare_data, train_command
from experiments.jobs import Job, run_jobs
from experiments.sweep_methods import CHAINED, JACOBI, METHODS, chained
from experiments.sweep_report import EVAL_SET, write_results
from pipeline.engine.checkpoint import epoch_tag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class SweepPlan:
    out: str
    points: tuple[int, ...]         # max_latent_stage values; latents = c_thought * point
    c_thought: int = 2
    cot_steps: int = 1500
    stage_steps: int = 200
    final_steps: int = 300
    latent_lr: float = 1e-3
    config: str = os.path.join(REPO, "configs", "tiny-cpu.yaml")
    nproc: int = 1
    batch: int = 32                 # samples per optimizer step (x the recipe's grad_accum): micro = batch / nproc
    eval_limit: int = 500
    max_new_tokens: int = 80
    seed: int = 0
    equal_budget: bool = False      # also train each point for as many steps as the largest one
    methods: tuple[str, ...] = CHAINED
    jacobi: int = 0                 # > 0: also each method with Jacobi latent updates of this many iterations

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def method_overrides(self) -> dict[str, list[str]]:
        """Sweep method -> its overrides: the chosen methods, then their Jacobi variants."""
        chosen = {m: METHODS[m] for m in self.methods}
        if self.jacobi:
            jacobi = ["method.latent_update=jacobi", f"method.jacobi_iterations={self.jacobi}"]
            chosen.update({m + JACOBI: [*extra, *jacobi] for m, extra in list(chosen.items())})
        return chosen


def run_command(plan: SweepPlan, shards: str, name: str, overrides: list[str]) -> list[str]:
    # model.init_seed 0 is the default; naming it only when it differs keeps the commands of
    # sweeps made before it was passed equal, so their finished jobs still count (experiments.jobs).
    seeds = [f"train.seed={plan.seed}"] + ([f"model.init_seed={plan.seed}"] if plan.seed else [])
    batch = f"train.micro_batch_size={plan.batch // plan.nproc}"
    return train_command(plan.config, shards, plan.out, name, plan.nproc,
                         [batch, *seeds, "train.epochs=1000", *overrides])


def eval_commands(plan: SweepPlan, shards: str, name: str) -> list[list[str]]:
    return merge_eval_commands(plan.run_dir(name), f"{EVAL_SET}={shards}", plan.eval_limit, plan.max_new_tokens)


def final_runs(plan: SweepPlan) -> dict[str, tuple[str, int, int]]:
    """Run name -> (method, point, steps of its own run). A chained method's run is the final
    stage after its chain; a CODI run trains from CoT for as many steps as the chain up to the
    point plus that final stage. With ``equal_budget``, each point below the largest also gets a
    ``-equal`` run longer by the stages it skipped, so every such run has trained as many latent
    steps as the largest point's."""
    top, runs = max(plan.points), {}
    for method in plan.method_overrides():
        own_chain = 0 if chained(method) else 1
        for n in plan.points:
            runs[f"{method}-{n}"] = (method, n, plan.final_steps + own_chain * n * plan.stage_steps)
            if plan.equal_budget and n < top:
                runs[f"{method}-{n}-equal"] = (method, n, runs[f"{method}-{n}"][2] + (top - n) * plan.stage_steps)
    return dict(sorted(runs.items(), key=lambda item: (item[0].endswith("-equal"), item[1][1])))


def jobs_for(plan: SweepPlan, shards: str) -> list[Job]:
    """The sweep as a job graph (references, chains, finals, evals), in the order they should start."""
    latent = ["method.name=coconut", f"method.c_thought={plan.c_thought}", f"train.lr={plan.latent_lr}",
              "train.warmup_steps=20"]
    cot_ckpt = os.path.join(plan.run_dir("cot"), "checkpoints")

    def train(name: str, overrides: list[str], after: list[str]) -> Job:
        return Job(f"train-{name}", [run_command(plan, shards, name, overrides)], after, [plan.run_dir(name)])

    jobs = [train(ref, [f"method.name={ref}", f"train.max_steps={plan.cot_steps}"], []) for ref in ("cot", "nocot")]
    top, methods = max(plan.points), plan.method_overrides()
    for method, extra in ((m, e) for m, e in methods.items() if chained(m)):
        # One curriculum chain per method: stage s = epoch s-1, each epoch stage_steps steps,
        # Adam state reset at each stage (as the reference does), every stage's checkpoint kept.
        jobs.append(train(f"{method}-chain", [
            *latent, *extra, f"method.max_latent_stage={top}", "curriculum.start_stage=1",
            "curriculum.reset_optimizer=stage", "train.schedule=constant", f"train.steps_per_epoch={plan.stage_steps}",
            f"train.max_steps={top * plan.stage_steps}", "checkpoint.keep_last=0",
            f"checkpoint.init_from={cot_ckpt}"], ["train-cot"]))
    finals = final_runs(plan)
    for name, (method, n, steps) in finals.items():
        if chained(method):             # the final stage, from the chain's checkpoint of stage n
            size = [f"method.max_latent_stage={n}", f"curriculum.start_stage={n + 1}"]
            after, start = f"train-{method}-chain", os.path.join(plan.run_dir(f"{method}-chain"), "checkpoints",
                                                                epoch_tag(n - 1))
        else:                           # CODI: c x n latents from its first step, from the CoT weights
            size, after, start = [], "train-cot", cot_ckpt
        schedule = ["train.schedule=cosine", f"train.max_steps={steps}"]
        latents = [] if chained(method) else [f"method.num_latent={plan.c_thought * n}"]
        jobs.append(train(name, [*latent, *methods[method], *size, *schedule, *latents,
                                 f"checkpoint.init_from={start}"], [after]))
    for name in ["cot", "nocot", *finals]:
        jobs.append(Job(f"eval-{name}", eval_commands(plan, shards, name), [f"train-{name}"],
                        [os.path.join(plan.run_dir(name), sub) for sub in ("merged", "eval")]))
    return jobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sweep", help="sweep directory (default runs/sweep)")
    parser.add_argument("--points", default="1,2,4,6,8",
                        help="max_latent_stage values, comma-separated (latents = c * point; default 1,2,4,6,8)")
    parser.add_argument("--c-thought", type=int, default=2, help="latents per replaced step (paper: 2)")
    parser.add_argument("--cot-steps", type=int, default=1500, help="optimizer steps of CoT and No-CoT")
    parser.add_argument("--stage-steps", type=int, default=200, help="optimizer steps per curriculum stage")
    parser.add_argument("--final-steps", type=int, default=300, help="optimizer steps of each final stage")
    parser.add_argument("--equal-budget", action="store_true",
                        help="control: also train every point but the largest for as many steps in all as the "
                             "largest (runs NAME-equal; the other runs and chains are shared)")
    parser.add_argument("--latent-lr", type=float, default=1e-3, help="peak lr of the latent runs")
    parser.add_argument("--methods", default=",".join(CHAINED),
                        help=f"latent methods, comma-separated, of {', '.join(METHODS)} (default "
                             f"{','.join(CHAINED)}; codi-simcot: c x point latents, trained from CoT for as many "
                             "latent steps as Coconut's run of the point)")
    parser.add_argument("--jacobi", type=int, default=0, metavar="T",
                        help="also run each method with Jacobi latent updates, T iterations (NAME-jacobi runs)")
    parser.add_argument("--train", type=int, default=20000, help="synthetic training problems")
    parser.add_argument("--max-steps", type=int, default=4, help="most reasoning steps per synthetic problem")
    parser.add_argument("--shards", help="use these shards (python -m data_prep build; with a test split) "
                                         "instead of generating synthetic ones; --train/--max-steps are then unused")
    parser.add_argument("--eval-limit", type=int, default=500, help="test problems per evaluation (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=80, help="generation budget per test problem")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny-cpu.yaml"), help="training recipe")
    parser.add_argument("--nproc", type=int, default=1, help="ZeRO-3 ranks per run (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="global batch of every run (a multiple of --nproc)")
    parser.add_argument("--lanes", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="data, data order and model init seed")
    parser.add_argument("--fresh", action="store_true",
                        help="delete OUT first (by default finished jobs with the same commands are kept)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    points = tuple(sorted({int(p) for p in args.points.split(",") if p.strip()}))
    if not points or points[0] < 1:
        parser.error(f"--points {args.points!r}: give positive integers, e.g. 1,2,4,6,8")
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} is not a multiple of --nproc {args.nproc}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods {args.methods!r}: give some of {', '.join(METHODS)}")
    if args.jacobi < 0:
        parser.error(f"--jacobi {args.jacobi}: give the iterations (> 0), or leave it out")
    out = os.path.abspath(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    plan = SweepPlan(out, points, args.c_thought, args.cot_steps, args.stage_steps, args.final_steps,
                     args.latent_lr, os.path.abspath(args.config), args.nproc, args.batch, args.eval_limit,
                     args.max_new_tokens, args.seed, args.equal_budget, methods, args.jacobi)
    start = time.perf_counter()
    given_shards = args.shards and os.path.abspath(args.shards)
    if given_shards:
        from data_prep.manifest import read_manifest

        read_manifest(given_shards)                      # not a shard directory: say so before any job runs
    if not os.path.isfile(args.config):
        raise FileNotFoundError(2, "no such recipe", args.config)
    check_settings(out, {"train": args.train, "max_steps": args.max_steps, "seed": args.seed, "shards": given_shards})
    shards = given_shards or prepare(out, args.train, args.max_steps, args.seed)
    # DeepSpeed picks CUDA where it exists; on a CPU box it must be told (DS_ACCELERATOR=cpu)
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    run_jobs(jobs_for(plan, shards), out, args.lanes, args.threads, cwd=REPO, env=env)
    table = write_results(plan, final_runs(plan), time.perf_counter() - start)
    print("\n" + table)
    print(f"\nsweep finished in {time.perf_counter() - start:.0f}s; results in {out}/results.md")
    return 0


def check_settings(out: str, settings: dict) -> None:
    """A resumed sweep must have the same data (every job's commands are compared by experiments.jobs,
    but the shard path stays the same when the data behind it would change)."""
    path = os.path.join(out, "sweep.json")
    settings = json.loads(json.dumps(settings))          # tuples as JSON lists, as read back
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            before = json.load(handle)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SystemExit(f"{path}: this sweep was started with other settings "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                             "add --fresh to start over, or pick another --out")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=1)


def prepare(out: str, n_train: int, max_steps: int, seed: int) -> str:
    """Synthetic data, tokenizer and shards (reused when a verified set is already there)."""
    from data_prep.summary import verify_shards
    from data_prep.synth import SynthConfig

    shards = os.path.join(out, "data", "shards")
    if os.path.isfile(os.path.join(shards, "manifest.json")) and not verify_shards(shards):
        print(f"reusing verified shards in {shards}", flush=True)
        return shards
    return prepare_data(out, n_train, seed, SynthConfig(max_steps=max_steps))


if __name__ == "__main__":
    raise SystemExit(main())
