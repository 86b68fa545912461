"""Benchmark P10 (``python -m benchmarks trainer``): the trainer's whole step, as a user pays it.

In one process (1 rank, 1 thread, fp32), the embedded default's recipe (``configs/tiny-cpu.yaml``:
CoT, micro batch 16, ZeRO-3) on the demo's synthetic shards (2,000 problems): ``Trainer.fit`` as
``python -m pipeline.train`` runs it (sampler, layout and collation, the engine step under the
memory plan's policy, telemetry, the stop flag, logging), against a plain PyTorch loop written
from scratch over the same records (a ``LlamaForCausalLM`` of the same shape, the explicit-CoT
text laid out and padded per step, ``model(...).loss``, gradient clipping, AdamW). The plain step
runs inside the trainer's loop right after each of its steps, so a slow spell of a shared machine
lands on both; each is timed from the end of the other's step to the end of its own. Median and
min-max of ``--steps`` steps after 10 warm-up, one line in a fixed form:

    trainer cot steps=<n> trainer=<ms> plain=<ms> ratio=<r>x
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

WARMUP = 10


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps after 10 warm-up (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both loops (default 1)")
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


def measure(steps: int, work: str) -> dict[str, list[float]]:
    from experiments.demo import prepare_data
    from pipeline.engine.config import load_config
    from pipeline.engine.trainer import Trainer

    shards = prepare_data(work, 2000, 0, n_valid=20, log=lambda *_, **__: None)   # the demo's data, smaller
    run = load_config("configs/tiny-cpu.yaml", [f"data={shards}", f"runs_dir={work}/runs", "name=p10",
                                                "train.validate=false", f"train.max_steps={WARMUP + steps}",
                                                "train.epochs=10", "checkpoint.checksums=false"])

    class InTurn(Trainer):
        """The trainer, with the plain loop's step run (and timed) after each of its own."""

        def _log_step(self, stage: int) -> None:
            super()._log_step(stage)
            now = time.perf_counter()
            times["trainer"].append(now - self.mark)
            plain()
            self.mark = time.perf_counter()
            times["plain"].append(self.mark - now)

    times: dict[str, list[float]] = {"trainer": [], "plain": []}
    trainer = InTurn(run)
    plain = plain_loop(run, trainer.train_records, trainer.special, trainer.vocab.size)
    trainer.mark = time.perf_counter()
    trainer.fit()
    return {name: values[WARMUP:] for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipeline.engine.distributed import init_distributed, teardown

    init_distributed()
    with tempfile.TemporaryDirectory() as work:
        times = measure(args.steps, work)
    ms = lambda xs: f"{1000 * statistics.median(xs):.1f}"  # noqa: E731
    spread = lambda xs: f"{1000 * min(xs):.0f}-{1000 * max(xs):.0f}"  # noqa: E731
    ratio = statistics.median(times["trainer"]) / statistics.median(times["plain"])
    print(f"P10 the trainer's loop vs a plain PyTorch loop: configs/tiny-cpu.yaml (CoT, micro batch 16), 1 rank, "
          f"{args.threads} thread(s), fp32 (goal ratio <= 1.25x)")
    print(f"trainer cot steps={len(times['trainer'])} trainer={ms(times['trainer'])} plain={ms(times['plain'])} "
          f"ratio={ratio:.2f}x   (min-max ms: trainer {spread(times['trainer'])}, plain {spread(times['plain'])})")
    teardown()
