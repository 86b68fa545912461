"""The CODI + SIM-CoT reference, transcribed from its semantics for the fidelity tests.

Source read: InternLM/SIM-CoT ``CODI/train.py`` (``preprocess``, the collator) and ``CODI/src/model.py``
(``get_steps``, ``pad_steps``, ``dedup_trailing_pads``, ``CODI.forward``) at commit f3ae967, as its
released scripts run them: ``use_prj``, ``use_decoder``, ``remove_eos`` as given, ``fix_attn_mask``
off, the decoder a model of the base's original vocabulary. Written here in our own words, call
for call: every model call is the reference's (the question with its mask, each latent and the
answer through the KV cache without one, the teacher without one), so only the semantics are
shared with the code under test, never its functions.

The one thing today's transformers would do differently is the question pass's mask: the reference
ran transformers 4.5x with SDPA on CUDA, whose ``_update_causal_mask`` builds an additive mask and
then ``_unmask_unattended`` lets a query row that can attend nothing (a left pad's) attend every
column. :func:`cuda_sdpa_mask` transcribes those two steps and the question pass gets that 4-D mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
ANSWER_PROMPT = "The answer is:"
PREFIX_LABEL = -570          # the reference's placeholder id for the latent in a step row


@dataclass
class ReferenceIds:
    """The reference's token ids: pad, bot, eot are the rows its resize adds (V, V+1, V+2) unless
    the tokenizer brings its own pad; steps open at ``opens`` and close at ``close``."""
    bos: int | None
    eos: int
    pad: int
    bot: int
    eot: int
    opens: tuple[int, ...]
    close: int


def preprocess(tok, problems, ids: ReferenceIds, remove_eos: bool = True, llama: bool = True) -> list[dict]:
    """train.py's ``preprocess`` for GSM8k-Aug: problems are (question, steps, answer) strings; the
    teacher's CoT is every step but the last joined by spaces; the answer "The answer is: X"."""
    src = [tok(q)["input_ids"] for q, _, _ in problems]
    cot = [tok(" ".join(steps[:-1]))["input_ids"] for _, steps, _ in problems]
    ans = [tok(f"The answer is: {a}")["input_ids"] + [ids.eos] for _, _, a in problems]
    if not remove_eos:
        src, cot = [s + [ids.eos] for s in src], [c + [ids.eos] for c in cot]
    if cot[0] and cot[0][0] == ids.bos:      # the reference looks at the first example only
        cot, ans = [c[1:] for c in cot], [a[1:] for a in ans]
    prompt = tok(ANSWER_PROMPT)["input_ids"]
    prompt = prompt[1:] if prompt[0] == ids.bos else prompt
    rows = []
    for s, c, a in zip(src, cot, ans):
        ref = s + c + a
        decoder = [ids.eot] + a if remove_eos else [ids.eot, ids.eos] + a
        rows.append({"encoder": s + [ids.bot], "decoder": decoder, "ref": ref,
                     "ref_labels": [IGNORE] * len(s) + ref[len(s):],
                     "ref_position": _match(ref, prompt), "model_position": _match(decoder, prompt)})
    shift = 1 if llama else 0                # "one more token standing for ' '" on LLaMA paths
    for row in rows:
        row["ref_position"] += shift - 1
        row["model_position"] += shift - 1
    return rows


def _match(seq: list[int], prompt: list[int]) -> int:
    starts = [i for i in range(len(seq) - len(prompt) + 1) if seq[i:i + len(prompt)] == prompt]
    assert len(starts) == 1, "the reference stops in breakpoint() here"
    return starts[0] + len(prompt)


def collate(rows: list[dict], pad: int) -> dict:
    """The reference's collator: the encoder left-padded, the rest right-padded."""
    def right(key, fill):
        width = max(len(r[key]) for r in rows)
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
    width = max(len(r["encoder"]) for r in rows)
    encoder = torch.tensor([[pad] * (width - len(r["encoder"])) + r["encoder"] for r in rows])
    return {"encoder": encoder, "encoder_mask": encoder.ne(pad).long(), "decoder": right("decoder", pad),
            "labels": right("decoder", IGNORE), "ref": right("ref", pad), "ref_labels": right("ref_labels", IGNORE),
            "ref_position": torch.tensor([r["ref_position"] for r in rows]),
            "model_position": torch.tensor([r["model_position"] for r in rows])}


def get_steps(ref: list[list[int]], slots: int, ids: ReferenceIds) -> list[list[list[int]]]:
    """model.py's ``get_steps``: cut at the first stop id (EOS, pad); a step runs from an opening id
    to the next closing id and gets the terminator (EOS); overflow steps merged into the last slot
    (terminators dropped, one added); missing slots are ``[pad]``."""
    stops, result = (ids.eos, ids.pad), []
    for seq in ref:
        seq = list(seq)
        for k, t in enumerate(seq):
            if t in stops:
                seq = seq[:k]
                break
        steps, i = [], 0
        while i < len(seq):
            if seq[i] in ids.opens:
                j, end = i + 1, None
                while j < len(seq):
                    if seq[j] == ids.close:
                        end = j
                        break
                    if seq[j] in stops:
                        break
                    j += 1
                if end is not None:
                    steps.append(seq[i:end + 1] + [ids.eos])
                    i = end + 1
                    continue
            i += 1
        if len(steps) > slots:
            merged = [t for s in steps[slots - 1:] for t in (s[:-1] if s and s[-1] == ids.eos else s)]
            steps = steps[:slots - 1] + [merged + [ids.eos]]
        while len(steps) < slots:
            steps.append([ids.pad])
        result.append(steps)
    return result


def pad_steps(steps: list[list[list[int]]], pad: int) -> list[list[list[int]]]:
    width = max(len(s) for row in steps for s in row)
    return [[s + [pad] * (width - len(s)) for s in row] for row in steps]


def dedup_trailing_pads(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = len(rows[0])
    while width > 1 and all(r[width - 2] == pad for r in rows):
        width -= 1
    return [r[:width] for r in rows]


def cuda_sdpa_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers 4.5x, LlamaModel._update_causal_mask for SDPA on CUDA: the additive causal mask
    with the padding folded in, then ``AttentionMaskConverter._unmask_unattended``."""
    lowest = torch.finfo(dtype).min
    b, t = mask.shape
    causal = torch.triu(torch.full((t, t), lowest, dtype=dtype), diagonal=1)
    causal = causal * (torch.arange(t) > torch.arange(t).reshape(-1, 1))
    causal = causal[None, None].expand(b, 1, -1, -1).clone()
    padding = (causal + mask[:, None, None, :].to(dtype)) == 0
    causal = causal.masked_fill(padding, lowest)
    return causal.mul(~torch.all(causal == lowest, dim=-1, keepdim=True))


@dataclass
class Settings:
    num_latent: int = 3
    distill_factor: float = 1.0
    distill_type: str = "smooth_l1"
    div_std: bool = True
    explain_factor: float = 1.0
    ref_factor: float = 1.0


def forward(codi, decoder, prj, batch: dict, ids: ReferenceIds, s: Settings) -> dict:
    """``CODI.forward`` with ``use_decoder`` and ``use_prj``: the loss terms it returns."""
    embed = codi.get_input_embeddings()
    out = codi(input_ids=batch["encoder"], use_cache=True, output_hidden_states=True,
               attention_mask=cuda_sdpa_mask(batch["encoder_mask"], embed.weight.dtype))
    past, latent = out.past_key_values, prj(out.hidden_states[-1][:, -1:])
    steps = pad_steps(get_steps(batch["ref"].tolist(), s.num_latent + 1, ids), ids.pad)
    explained, counted = [], 0
    for slot in range(s.num_latent + 1):
        if slot:
            out = codi(inputs_embeds=latent, use_cache=True, output_hidden_states=True, past_key_values=past)
            past, latent = out.past_key_values, prj(out.hidden_states[-1][:, -1:])
        loss = _explain(decoder, embed, latent, steps, slot, ids.pad)
        if loss is not None:
            explained.append(loss)
            counted += 1
        if slot == s.num_latent:
            student = codi(inputs_embeds=embed(batch["decoder"]), use_cache=True, output_hidden_states=True,
                           past_key_values=past)
    with torch.no_grad():
        teacher_targets = codi(input_ids=batch["ref"], output_hidden_states=True)
    teacher = codi(input_ids=batch["ref"], output_hidden_states=True)
    distill = sum(_distill(o, t, batch["model_position"], batch["ref_position"], s)
                  for o, t in zip(student.hidden_states, teacher_targets.hidden_states)) / len(student.hidden_states)
    answer_ce = _shifted_ce(student.logits, batch["labels"])
    teacher_ce = _shifted_ce(teacher.logits, batch["ref_labels"]) * s.ref_factor
    step_ce = sum(explained) * s.explain_factor / max(1, counted) if explained else torch.zeros(())
    total = answer_ce + distill * s.distill_factor + teacher_ce + step_ce
    return {"answer_ce": answer_ce, "teacher_ce": teacher_ce, "distill": distill, "step_ce": step_ce, "total": total}


def _explain(decoder, embed, latent, steps, slot: int, pad: int):
    rows = []
    for row in steps:                        # the trailing-pad trim inside the loop (row 0's width)
        rows.append(row[slot])
        rows = dedup_trailing_pads(rows, pad)
    indices = torch.tensor(rows)
    inputs = torch.cat([latent, embed(indices)], dim=1)
    with_prefix = torch.cat([torch.full((len(rows), 1), PREFIX_LABEL), indices], dim=1)
    labels = with_prefix.masked_fill((with_prefix == PREFIX_LABEL) | (with_prefix == pad), IGNORE)
    if (labels != IGNORE).sum() == 0:
        return None
    logits = decoder(inputs_embeds=inputs, attention_mask=with_prefix.ne(pad).long()).logits
    return _shifted_ce(logits, labels)


def _distill(student, teacher, model_position, ref_position, s: Settings):
    rows = torch.arange(len(model_position))
    out, ref = student[rows, model_position][:, None], teacher[rows, ref_position][:, None].detach()
    loss = (F.mse_loss if s.distill_type == "l2" else F.smooth_l1_loss)(out, ref)
    if s.div_std:
        if s.distill_type == "l2":
            loss = loss / ref.std()
        loss = loss / ref.std()
    return loss


def _shifted_ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)
