"""Benchmarks P1 and P4 for the latent core (``python -m benchmarks latent``).

P1: one SIM-CoT(CODI) training step (forward + backward) of ``LatentReasoner`` against
    :func:`straightforward_codi_step`, a benchmark-only rendering of what the reference does
    (teacher run twice, the step decoder once per slot, every hidden state kept, full-vocabulary
    logits at every position), on the same weights and batch, alternated in one process.
P4: peak activation memory of a 16-latent Coconut step with checkpointing through the latent
    passes on vs off (CPU allocations recorded by the profiler; activations = peak - end).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from benchmarks.fixtures import PREFIX, SPECIAL, bench_model, synthetic_records
from pipeline.latent.batch import Batch
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner


def straightforward_codi_step(model: LatentReasoner, batch: Batch) -> torch.Tensor:
    """Benchmark baseline only: the reference's CODI+SIM-CoT step, straightforwardly written."""
    base, dec, n = model.base, model.step_decoder, int(batch.n_latents)
    teacher = dict(input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask,
                   position_ids=batch.teacher_position_ids, output_hidden_states=True)
    with torch.no_grad():
        targets = base(**teacher).hidden_states                                  # teacher pass 1
    t_out = base(**teacher)                                                      # teacher pass 2
    teacher_ce = F.cross_entropy(t_out.logits[:, :-1].flatten(0, 1), batch.teacher_labels[:, 1:].flatten())
    first = int(batch.first_latent)
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    cache = DynamicCache()
    out = base(input_ids=ids[:, :first], attention_mask=mask[:, :first], position_ids=pos[:, :first],
               cache=cache, use_cache=True, output_hidden_states=True)
    z = model.projection(out.hidden_states[-1][:, -1:])
    latents = []
    for i in range(n):
        latents.append(z)
        out = base(inputs_embeds=z, attention_mask=mask[:, :first + i + 1],
                   position_ids=pos[:, first + i:first + i + 1], cache=out.cache, use_cache=True,
                   output_hidden_states=True)
        z = model.projection(out.hidden_states[-1])
    latents.append(z)
    tail = first + n
    out = base(input_ids=ids[:, tail:], attention_mask=mask, position_ids=pos[:, tail:], cache=out.cache,
               use_cache=True, output_hidden_states=True)
    answer_ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.labels[:, tail + 1:].flatten())
    rows = torch.arange(ids.size(0))
    s_idx, t_idx = batch.distill_index - tail, batch.teacher_distill_index
    distill = sum(F.smooth_l1_loss(s[rows, s_idx], t[rows, t_idx]) / t[rows, t_idx].std()
                  for s, t in zip(out.hidden_states, targets)) / len(targets)
    step_losses = []
    for slot in range(batch.step_ids.size(1)):                               # decoder once per slot
        steps, length = batch.step_ids[:, slot], batch.step_lengths[:, slot]
        eos = torch.full_like(steps[:, :1], model.eos_id)
        target = torch.where(torch.arange(steps.size(1) + 1) == length[:, None], eos, torch.cat([steps, eos], 1))
        labels = torch.where((torch.arange(steps.size(1) + 1) <= length[:, None]) & (length[:, None] > 0), target, -100)
        embeds = torch.cat([latents[slot], base.get_input_embeddings()(steps)], 1)
        logits = dec(inputs_embeds=embeds, output_hidden_states=True).logits
        if (labels != -100).any():
            step_losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    step_ce = sum(step_losses) / max(1, len(step_losses))
    return answer_ce + teacher_ce + distill + step_ce


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_p1(vocab: int = 128_256, repeats: int = 5) -> dict:
    cfg = MethodConfig("codi", num_latent=6, simcot=True)
    model = LatentReasoner(bench_model(vocab), cfg, eos_id=SPECIAL["eos"])
    batch = collate_aligned([layout(r, SPECIAL, cfg, 0, PREFIX) for r in synthetic_records(8, vocab)],
                            SPECIAL["latent"], SPECIAL["pad"])

    def ours():
        model.zero_grad(set_to_none=True)
        model(batch)["total"].backward()

    def baseline():
        model.zero_grad(set_to_none=True)
        straightforward_codi_step(model, batch).backward()

    ours(), baseline()                                            # warm-up
    t_ours, t_base = [], []
    for _ in range(repeats):                                      # alternate: same machine state
        t_ours += _time(ours, 1)
        t_base += _time(baseline, 1)
    return {"ours_s": t_ours, "baseline_s": t_base,
            "ratio": statistics.median(t_ours) / statistics.median(t_base)}


def activation_peak(fn) -> float:
    """Bytes: peak of CPU allocations during ``fn`` above what is still held at its end (the grads)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self_ (not inclusive) usage, so a parent op does not count its children's allocations again
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak - current)


def bench_p4(n_latents: int = 16) -> dict:
    cfg = MethodConfig("coconut", c_thought=2, max_latent_stage=n_latents // 2, simcot=False)
    records = synthetic_records(8, 4096)
    batch = collate_aligned([layout(r, SPECIAL, cfg, n_latents // 2 + 1) for r in records], SPECIAL["latent"], 0)
    result, grads = {}, {}
    for use in (False, True):
        model = LatentReasoner(bench_model(4096), cfg, gradient_checkpointing=use)

        def step(model=model):
            model(batch)["total"].backward()

        step()
        model.zero_grad(set_to_none=False)
        result["checkpointing" if use else "plain"] = activation_peak(step)
        grads[use] = [p.grad.clone() for p in model.parameters()]
    result["ratio"] = result["checkpointing"] / result["plain"]
    result["max_grad_diff"] = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
    return result


def main() -> None:
    torch.set_num_threads(2)
    p4 = bench_p4()
    print(f"P4 activation peak, 16 latents: checkpointing {p4['checkpointing'] / 2**20:.1f} MiB vs plain "
          f"{p4['plain'] / 2**20:.1f} MiB = {p4['ratio']:.2f}x (goal <= 0.35), max grad diff {p4['max_grad_diff']:.1e}")
    p1 = bench_p1()
    print(f"P1 CODI+SIM-CoT step, vocab 128,256, batch 8, 6 latents: ours {statistics.median(p1['ours_s']):.3f}s "
          f"({min(p1['ours_s']):.3f}-{max(p1['ours_s']):.3f}) vs straightforward "
          f"{statistics.median(p1['baseline_s']):.3f}s ({min(p1['baseline_s']):.3f}-{max(p1['baseline_s']):.3f}) "
          f"= {p1['ratio']:.2f}x (goal <= 0.4)")
