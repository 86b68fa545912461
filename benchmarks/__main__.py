"""Benchmarks: ``python -m benchmarks {build,latent,generate,zero,overhead,gpu,jacobi} [options]``.

Each figure is a ratio against a baseline run in the same process; the README lists the results.
``make bench`` runs the ones this CPU can (P6 needs a GPU)."""
from __future__ import annotations

import argparse
import importlib

# name -> (module, what it measures, whether it takes its own options)
BENCHMARKS = {
    "build": ("benchmarks.build", "P7 data_prep build throughput", True),
    "latent": ("benchmarks.latent", "P1 latent step time, P4 activation memory", False),
    "generate": ("benchmarks.generate", "P2 batched latent inference", False),
    "zero": ("benchmarks.zero", "P3 ZeRO-3 gather volume, P5 model states", False),
    "overhead": ("benchmarks.overhead", "P8 engine step vs plain PyTorch", True),
    "gpu": ("benchmarks.gpu", "P6 throughput and MFU on one GPU", True),
    "jacobi": ("benchmarks.jacobi", "P9 parallel (Jacobi) vs sequential latents", True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=list(BENCHMARKS),
                        help="; ".join(f"{name}: {what}" for name, (_, what, _) in BENCHMARKS.items()))
    args, rest = parser.parse_known_args(argv)
    module, _, takes_options = BENCHMARKS[args.which]
    if rest and not takes_options:
        parser.error(f"{args.which} takes no options, got {' '.join(rest)}")
    run = importlib.import_module(module).main
    run(rest) if takes_options else run()


if __name__ == "__main__":
    main()
