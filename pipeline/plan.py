"""Will this recipe fit? Per-rank memory of one training step on the given GPUs, and the policy.

    python -m pipeline.plan --config configs/llama3.1-8b-codi-simcot.yaml --nodes 1 --gpus-per-node 8 \\
        --gpu-mem-gib 80 [--cpu-mem-gib 1024] [--question-tokens 96 --steps 6 --step-tokens 16] [key=value ...]

Prints partitioned parameters, gradients and optimizer states, the gathered weights, the
activations of the latent loop with and without checkpointing, CPU memory under offload, the
ZeRO-3 gather policy it picks and the global batch. Exit 0 when it fits; exit 3 with the reason
and what to change when it does not; exit 2 for a config it cannot read. The model is sized on
the meta device from its config (no weights, no download for the recipes' models); training runs
the same plan at start-up. Bf16 on GPUs, as the trainer runs there.
"""
from __future__ import annotations

import argparse
import sys

from common.cli import PLAN_EXIT, run_cli


def plan_for(config_path: str | None, overrides: list[str], nodes: int, gpus_per_node: int, gpu_mem_gib: float,
             cpu_mem_gib: float, seq=None):
    """-> the MemoryPlan of a recipe on that hardware (bf16 on GPUs, as the trainer runs there)."""
    from pipeline.engine.config import for_world, load_config
    from pipeline.engine.ds_config import resolve_ds_config
    from pipeline.engine.memory_plan import Hardware, SequenceShape, make_plan
    from pipeline.engine.model_shapes import model_sizes

    hardware = Hardware(nodes, gpus_per_node, gpu_mem_gib, cpu_mem_gib)
    run = for_world(load_config(config_path, overrides), hardware.world)
    sizes = model_sizes(run)
    bf16 = run.model.dtype in ("auto", "bf16")
    ds = resolve_ds_config(run.deepspeed, run, hardware.world, sizes.hidden, on_cuda=True, bf16=bf16,
                           trainable_params=sizes.trainable)
    return make_plan(run, sizes, ds, hardware, seq or SequenceShape()), sizes


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    from pipeline.engine.memory_plan import SequenceShape

    defaults = SequenceShape()
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--cpu-mem-gib", type=float, default=1024.0, help="CPU memory of one node, for offload")
    parser.add_argument("--question-tokens", type=int, default=defaults.question)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="reasoning steps per problem")
    parser.add_argument("--step-tokens", type=int, default=defaults.step)
    parser.add_argument("--answer-tokens", type=int, default=defaults.answer)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    return parser


def _main(argv: list[str] | None) -> int:
    from pipeline.engine.memory_plan import SequenceShape

    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.nodes, args.gpus_per_node) < 1 or args.gpu_mem_gib <= 0:
        parser.error("--nodes and --gpus-per-node must be >= 1 and --gpu-mem-gib > 0")
    seq = SequenceShape(args.question_tokens, args.steps, args.step_tokens, args.answer_tokens)
    plan, sizes = plan_for(args.config, args.overrides, args.nodes, args.gpus_per_node, args.gpu_mem_gib,
                           args.cpu_mem_gib, seq)
    print(f"{args.config}: {sizes.total / 1e9:.2f}B parameters ({sizes.trainable / 1e9:.2f}B trainable; step "
          f"decoder {sizes.decoder / 1e9:.2f}B) on {args.nodes} node(s) x {args.gpus_per_node} GPU(s) x "
          f"{args.gpu_mem_gib:g} GiB")
    print(plan.render())
    return 0 if plan.fits else PLAN_EXIT


if __name__ == "__main__":
    sys.exit(main())
