"""Benchmarks: ``python -m pipeline.bench {latent,generate,zero,overhead,gpu,jacobi}`` (P1+P4, P2, P3+P5, P8, P6, P9).

Each figure is a ratio against a baseline run in the same process; the README lists the results."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    parser.add_argument("which", choices=["latent", "generate", "zero", "overhead", "gpu", "jacobi"],
                        help="latent: P1 step time, P4 activation memory; generate: P2 inference; zero: P3 gather "
                             "volume, P5 model states; overhead: P8 engine step vs plain PyTorch; gpu: P6 "
                             "throughput and MFU on one GPU; jacobi: P9 parallel vs sequential latents")
    args, rest = parser.parse_known_args(argv)
    if args.which == "latent":
        from .bench_latent import main as run
        run()
    elif args.which == "generate":
        from .bench_generate import main as run
        run()
    elif args.which == "gpu":
        from .bench_gpu import main as run
        run(rest)
    elif args.which == "overhead":
        from .bench_overhead import main as run
        run(rest)
    elif args.which == "jacobi":
        from .bench_jacobi import main as run
        run(rest)
    elif args.which == "zero":
        from .bench_zero import main as run
        run()


if __name__ == "__main__":
    main()
