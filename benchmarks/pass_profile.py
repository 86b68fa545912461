"""Benchmark P11 (``python -m benchmarks pass_profile``): where the host time of one latent pass goes.

One latent pass is the latent loop's unit of work (``pipeline.latent.loop.run_pass``): a forward of
one column per row through every layer, with the keys and values of the columns before it. On one
CPU thread, fp32, batch 4 after a 40-token question, at the P8 shape (hidden 64, 2 layers: host-bound)
and a larger one (hidden 256, 8 layers), without and with gradients: the forward's time, the part
spent inside the decoder layers (hooks around each), the rest (transformers' model-level work:
mask building, rotary embedding, cache and output objects, decorators), the backward's time, and
the operators dispatched (torch.profiler). Median of 50 passes after 10 warm-up. One line per case:

    pass_profile hidden=<h> layers=<l> grad=<bool> forward=<ms> in_layers=<ms> wrapper=<ms> (<p>%) backward=<ms> ops=<n>
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.fixtures import bench_model

SHAPES = ((64, 2), (256, 8))
BATCH, QUESTION = 4, 40


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks pass_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed passes per case (default 50)")
    return parser


def measure(hidden: int, layers: int, grad: bool, repeats: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    from pipeline.latent.loop import run_pass

    torch.manual_seed(0)
    body = bench_model(1000, layers=layers, hidden=hidden).get_decoder()
    mask = torch.ones(BATCH, QUESTION + 1, dtype=torch.long)
    positions = torch.arange(QUESTION + 1).expand(BATCH, -1)
    with torch.no_grad():
        _, question, _ = run_pass(body, torch.randn(BATCH, QUESTION, hidden), mask[:, :QUESTION],
                                  positions[:, :QUESTION], [])
    inside, opened = [0.0], [0.0]
    hooks = [layer.register_forward_pre_hook(lambda *_: opened.__setitem__(0, time.perf_counter()))
             for layer in body.layers]
    hooks += [layer.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - opened[0]))
              for layer in body.layers]

    def one_pass() -> float:
        """-> the backward's time (0 without gradients)."""
        latent = torch.randn(BATCH, 1, hidden, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            hidden_out, _, _ = run_pass(body, latent, mask, positions[:, QUESTION:], [question])
        if not grad:
            return 0.0
        start = time.perf_counter()
        hidden_out.sum().backward()
        return time.perf_counter() - start

    forwards, layer_times, backwards = [], [], []
    for i in range(10 + repeats):
        inside[0] = 0.0
        start = time.perf_counter()
        backward = one_pass()
        if i >= 10:
            forwards.append(time.perf_counter() - start - backward)
            layer_times.append(inside[0])
            backwards.append(backward)
    for hook in hooks:
        hook.remove()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_pass()
    ops = sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))
    return {"forward": statistics.median(forwards), "in_layers": statistics.median(layer_times),
            "backward": statistics.median(backwards), "ops": ops}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print("P11 host time of one latent pass (1 thread, fp32, batch 4, 40-token question): the forward inside the "
          "decoder layers and around them (transformers' model-level work), the backward, the operators dispatched")
    for hidden, layers in SHAPES:
        for grad in (False, True):
            r = measure(hidden, layers, grad, args.repeats)
            wrapper = r["forward"] - r["in_layers"]
            print(f"pass_profile hidden={hidden} layers={layers} grad={grad} forward={1e3 * r['forward']:.2f}ms "
                  f"in_layers={1e3 * r['in_layers']:.2f}ms wrapper={1e3 * wrapper:.2f}ms "
                  f"({100 * wrapper / r['forward']:.0f}%) backward={1e3 * r['backward']:.2f}ms ops={r['ops']}",
                  flush=True)
