"""What the latents say: each latent (Coconut: each group of ``c``) decoded greedily by the
SIM-CoT step decoder, and its logit-lens top-5 through the base's LM head.

    steps = decode_latents(load_merged("runs/NAME/merged"), records, n_problems=3)
"""
from __future__ import annotations

import torch

from pipeline.inference.generate import Decoding, decoder_stack, left_pad_prompts, prefill
from pipeline.inference.merged import MergedModel
from pipeline.latent.loop import run_pass
from pipeline.latent.methods import get_method


@torch.no_grad()
def decode_latents(merged: MergedModel, records: list[dict], n_problems: int = 3, max_len: int = 24) -> list[dict]:
    """For the first ``n_problems``: the gold steps, each latent group's decoded step (through
    ``decoder_in`` when the decoder is narrower than the base), each latent's logit-lens top-5."""
    sp, cfg, model = merged.special, merged.cfg, merged.model
    method = get_method(cfg.name)
    if merged.stage_latents == 0 or not method.fills_latents or n_problems <= 0:
        return []
    ids, mask = left_pad_prompts([merged.prompt(r) for r in records[:n_problems]], sp["pad"])
    device = model.get_input_embeddings().weight.device
    _, _, latents, latent_mask = prefill(model, ids.to(device), mask.to(device), sp["latent"], merged.projection,
                                         cfg.jacobi, cfg.reference_attention, merged.body_forward)
    per_row = list(latents) if latent_mask is None else [v[m] for v, m in zip(latents, latent_mask)]
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    c = cfg.slot_width()
    groups = [len(v) // c for v in per_row]
    steps = [None] * sum(groups)
    if merged.decoder is not None and sum(groups):     # every group of every problem at once: [groups, c, d]
        prefixes = torch.cat([v[:g * c].reshape(g, c, v.size(-1)) for v, g in zip(per_row, groups)])
        into = merged.decoder_in or (lambda x: x)
        rows = greedy_steps(merged.decoder, lambda t: into(embed(t)), into(prefixes), sp["eos"], max_len,
                            method.decoder_first_position, merged.body_forward)
        steps = [merged.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    out, cursor = [], 0
    for row, record in enumerate(records[:n_problems]):
        lens = [merged.tokenizer.convert_ids_to_tokens(head(v).topk(5).indices.tolist()) for v in per_row[row]]
        out.append({"id": record["id"], "question": record["question"], "gold_steps": record["steps"],
                    "decoded_steps": steps[cursor:cursor + groups[row]], "logit_lens_top5": lens,
                    "latents": per_row[row].float().tolist()})
        cursor += groups[row]
    return out


@torch.no_grad()
def greedy_steps(decoder, embed, prefixes: torch.Tensor, eos: int, max_len: int, first_position: int = 0,
                 body_forward: str = "auto") -> list[list[int]]:
    """Greedy token ids from latent embeddings, all prefixes as one batch (equal lengths: no
    padding) on the KV cache, positions counted from ``first_position`` as in training, by the
    stack training ran (``body_forward``); each row ends before its EOS (a prefix at a time, without
    the cache, re-reads every prefix per token)."""
    body, head = decoder.get_decoder(), decoder.get_output_embeddings()
    stack = decoder_stack(body_forward, body.config)
    positions = torch.arange(prefixes.size(1), device=prefixes.device).add(first_position).expand(len(prefixes), -1)
    hidden, chunk, _ = run_pass(body, prefixes, None, positions, [], body_forward=stack, kind="step_decoder")
    decode = Decoding(body, [chunk], None, positions[:, -1], max_len, stack, kind="step_decoder")
    done, rows = [False] * len(prefixes), []
    for step in range(max_len):
        token = head(hidden[:, -1]).argmax(-1)
        values = token.tolist()                 # the step's one copy to the host
        done = [d or v == eos for d, v in zip(done, values)]
        if all(done):
            break
        rows.append([eos if d else v for d, v in zip(done, values)])
        if step < max_len - 1:
            hidden = decode.step(embed(token[:, None]))
    rows = [list(row) for row in zip(*rows)] or [[] for _ in prefixes]
    return [row[:row.index(eos)] if eos in row else row for row in rows]
