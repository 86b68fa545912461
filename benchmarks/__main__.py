"""Benchmarks: ``python -m benchmarks NAME [options]``, NAME one of build, latent, generate, zero,
overhead, gpu, jacobi, trainer, pass_profile, compile, data_scale.

Each figure is a ratio against a baseline run in the same process; the README lists the results.
``make bench`` runs the ones this CPU can (P6 needs a GPU). What a benchmark prints is also kept in
``benchmarks/results/DATE-NAME-HARDWARE.txt`` (``--no-save``: not), headed by the command, the
machine and the library versions, so a figure can be traced to where it was measured."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import os
import platform
import re
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name -> (module, what it measures, whether it takes its own options)
BENCHMARKS = {
    "build": ("benchmarks.build", "P7 data_prep build throughput", True),
    "latent": ("benchmarks.latent", "P1 latent step time, P4 activation memory", False),
    "generate": ("benchmarks.generate", "P2 batched latent inference", False),
    "zero": ("benchmarks.zero", "P3 ZeRO-3 gather volume, P5 model states", False),
    "overhead": ("benchmarks.overhead", "P8 engine step vs plain PyTorch", True),
    "gpu": ("benchmarks.gpu", "P6 throughput and MFU on one GPU", True),
    "jacobi": ("benchmarks.jacobi", "P9 parallel (Jacobi) vs sequential latents", True),
    "trainer": ("benchmarks.trainer", "P10 the trainer's loop vs a plain PyTorch loop", True),
    "pass_profile": ("benchmarks.pass_profile", "P11 host time of one latent pass", True),
    "compile": ("benchmarks.compile", "P12 the latent passes' forward: transformers', lean, compiled", True),
    "data_scale": ("benchmarks.data_scale", "P13 build and trainer start-up at GSM8k-Aug scale and beyond", True),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments; a benchmark's own options go to its ``build_parser``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=list(BENCHMARKS),
                        help="; ".join(f"{name}: {what}" for name, (_, what, _) in BENCHMARKS.items()))
    parser.add_argument("--no-save", action="store_true", help="print only; keep no file in benchmarks/results")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    module, _, takes_options = BENCHMARKS[args.which]
    if rest and not takes_options:
        parser.error(f"{args.which} takes no options, got {' '.join(rest)}")
    run = importlib.import_module(module).main
    if args.no_save:
        run(rest) if takes_options else run()
        return
    os.makedirs(RESULTS, exist_ok=True)
    name, header = hardware()
    path = os.path.join(RESULTS, f"{datetime.date.today().isoformat()}-{args.which}-{name}.txt")
    with open(path, "a", encoding="utf-8") as record, contextlib.redirect_stdout(Tee(sys.stdout, record)):
        print(f"$ python -m benchmarks {args.which} {' '.join(rest)}".rstrip() + f"\n# {header}")
        run(rest) if takes_options else run()
    print(f"(kept in {os.path.relpath(path)})")


class Tee:
    """Writes to the terminal and to the result file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> None:
        for stream in self.streams:
            stream.write(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def hardware() -> tuple[str, str]:
    """-> (a file-name slug of the accelerator or CPU, a one-line description with versions)."""
    import deepspeed
    import torch
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu-{os.cpu_count()}cores"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return slug, (f"{device} | {platform.machine()} {platform.system()} | torch {torch.__version__}, deepspeed "
                  f"{deepspeed.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
