"""Benchmarks: ``python -m pipeline.bench latent`` (P1, P4). See shared/docs/BENCHMARKS.md."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    parser.add_argument("which", choices=["latent"], help="latent: P1 step time and P4 activation memory")
    args = parser.parse_args(argv)
    if args.which == "latent":
        from .bench_latent import main as run
        run()


if __name__ == "__main__":
    main()
