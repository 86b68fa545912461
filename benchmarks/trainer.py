"""Benchmark P10 (``python -m benchmarks trainer``): the trainer's whole step, as a user pays it.

1 rank, fp32, the embedded default's recipe (``configs/tiny-cpu.yaml``: CoT, micro batch 16,
ZeRO-3) on the demo's synthetic shards (2,000 problems): ``Trainer.fit`` as ``python -m
pipeline.train`` runs it (sampler, layout and collation, the engine step under the memory plan's
policy, telemetry, the stop flag, logging), each step timed from the end of the one before, against
a plain loop written without the project's code over the same records (a ``LlamaForCausalLM`` of
the same shape, the explicit-CoT text laid out and padded per step, ``model(...).loss``, gradient
clipping, AdamW). Each runs in a clean process of its own, 10 steps at a time in turn
(benchmarks/in_turn.py), at 1 thread and at the machine's default. Median and min-max of ``--steps``
steps after 10 warm-up, one line per thread count in a fixed form:

    trainer cot threads=<t> steps=<n> trainer=<ms> plain=<ms> ratio=<r>x
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from benchmarks.in_turn import Side, in_turn, timed_forever

WARMUP = 10


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps after 10 warm-up (default 60)")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="comma-separated torch thread counts, both loops alike (default: 1 and this machine's)")
    return parser


def plain_loop(run, records: list[dict], special: dict[str, int], vocab: int, seed: int = 0):
    """A from-scratch CoT training step over ``records``: -> step() that trains on the next batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t, m = run.model.tiny, run.train
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                                         num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                                         intermediate_size=t.intermediate_size, tie_word_embeddings=True,
                                         attn_implementation="sdpa"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=m.lr, betas=tuple(m.betas), weight_decay=m.weight_decay)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cursor = [0]

    def step() -> None:
        batch = [records[order[(cursor[0] + i) % len(order)]] for i in range(m.micro_batch_size)]
        cursor[0] += m.micro_batch_size
        rows = [r["question_ids"] + [t for s in r["step_ids"] for t in s] + r["answer_ids"] + [special["eos"]]
                for r in batch]
        width = max(map(len, rows))
        ids = torch.tensor([r + [special["pad"]] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = torch.tensor([[-100] * len(b["question_ids"]) + r[len(b["question_ids"]):] + [-100] * (width - len(r))
                               for b, r in zip(batch, rows)])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), m.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def recipe(shards: str, work: str, steps: int):
    from pipeline.engine.config import load_config

    return load_config("configs/tiny-cpu.yaml", [f"data={shards}", f"runs_dir={work}/runs", "name=p10",
                                                 "train.validate=false", f"train.max_steps={steps}", "train.epochs=10",
                                                 "checkpoint.checksums=false"])


def trainer_side(pace, shards: str, work: str, steps: int) -> None:
    """``Trainer.fit``, each optimizer step timed from the end of the one before, in a process of its own."""
    from pipeline.engine.distributed import teardown
    from pipeline.engine.trainer import Trainer

    class Paced(Trainer):
        def _log_step(self, stage: int) -> dict[str, float]:
            metrics = super()._log_step(stage)
            pace(time.perf_counter() - self.mark)
            self.mark = time.perf_counter()
            return metrics

    trainer = Paced(recipe(shards, work, steps))
    try:
        pace.start()
        trainer.mark = time.perf_counter()
        trainer.fit()
    finally:
        teardown()


def plain_side(pace, shards: str, work: str, steps: int) -> None:
    """The plain loop over the same records, in a clean process (the shards read, no project model code)."""
    from data_prep import load_shards
    from pipeline.latent.vocab import Vocab

    data = load_shards(shards)
    vocab = Vocab.of(data)
    step = plain_loop(recipe(shards, work, steps), data.split("train").to_list(), vocab.special, vocab.size)
    timed_forever(lambda _: step(), [None], pace)


def measure(steps: int, threads: int, work: str, shards: str) -> dict[str, list[float]]:
    kwargs = {"shards": shards, "work": work, "steps": WARMUP + steps + 1}
    return in_turn({"trainer": Side(__name__, "trainer_side", kwargs), "plain": Side(__name__, "plain_side", kwargs)},
                   threads, WARMUP, steps, chunk=10)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from experiments.demo import prepare_data

    print("P10 the trainer's loop vs a plain PyTorch loop, each in a clean process: configs/tiny-cpu.yaml (CoT, "
          "micro batch 16), 1 rank, fp32 (goal ratio <= 1.15x at every thread count)", flush=True)
    with tempfile.TemporaryDirectory() as work:
        shards = prepare_data(work, 2000, 0, n_valid=20, log=lambda *_, **__: None)   # the demo's data, smaller
        for threads in (int(x) for x in dict.fromkeys(args.threads.split(","))):
            times = measure(args.steps, threads, work, shards)
            ms = lambda xs: f"{1000 * statistics.median(xs):.1f}"  # noqa: E731
            spread = lambda xs: f"{1000 * min(xs):.0f}-{1000 * max(xs):.0f}"  # noqa: E731
            ratio = statistics.median(times["trainer"]) / statistics.median(times["plain"])
            print(f"trainer cot threads={threads} steps={len(times['trainer'])} trainer={ms(times['trainer'])} "
                  f"plain={ms(times['plain'])} ratio={ratio:.2f}x   (min-max ms: trainer {spread(times['trainer'])}, "
                  f"plain {spread(times['plain'])})", flush=True)
