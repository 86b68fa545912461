"""Stage 2: train a latent-reasoning model under DeepSpeed.

    python -m pipeline.train --config configs/tiny-cpu.yaml [key=value ...]
    ./launch.sh train --config configs/tiny-cpu.yaml --nproc 2          (several ranks)

A run directory ``runs/<name>/`` gets the resolved config, the resolved DeepSpeed JSON,
checkpoints, TensorBoard events (``tb/``) and ``metrics.jsonl``. Re-running the same command
resumes from the last complete checkpoint. On SIGTERM/SIGUSR1 the step finishes, a checkpoint is
written and the process exits 75 (the Slurm script requeues the job). The memory plan
(``python -m pipeline.plan``) is printed at start-up; a run that does not fit exits 3.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from common.cli import run_cli

    return run_cli(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)   # the deepspeed launcher adds it
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 method.simcot=true")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from common.cli import DATA_ERROR_EXIT, PLAN_EXIT, UserError
    from data_prep import ShardError
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.engine.config import load_config
    from pipeline.engine.distributed import teardown
    from pipeline.engine.engine_plan import PlanError
    from pipeline.engine.trainer import Trainer

    run = load_config(args.config, args.overrides)      # a mistake there: one line, exit 2 (run_cli)
    try:
        code = Trainer(run).fit()
    except UserError:                               # missing shards, a setting this machine cannot run
        raise
    except (ShardError, CheckpointError) as err:    # corrupted data or checkpoint: say which file
        print(f"error: {err}", file=sys.stderr, flush=True)
        return DATA_ERROR_EXIT
    except PlanError as err:                        # the memory plan (printed above) does not fit
        print(f"error: does not fit: {err}", file=sys.stderr, flush=True)
        return PLAN_EXIT
    teardown()
    return code


if __name__ == "__main__":
    exit_code = main()
    # Everything is written and closed by now (checkpoints, metrics, the process group), so skip
    # the interpreter's finalizers: a finished rank once still aborted after "finished:" despite
    # the explicit teardown ("terminate called without an active exception", exit -6; a resumed
    # 2-node Slurm run in a full test run), which turns a finished job into a FAILED one. The
    # C++ objects DeepSpeed still holds (process groups) are destroyed in no set order at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
