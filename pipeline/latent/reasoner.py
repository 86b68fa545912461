"""``LatentReasoner``: base causal LM + optional CODI projection + optional SIM-CoT step decoder.

    model = LatentReasoner(base, MethodConfig("codi", simcot=True))
    losses = model(batch)      # {"answer_ce", "teacher_ce", "distill", "step_ce", "total"}

Methods are configuration of this one module: what differs between them is asked of the method
object (``pipeline.latent.methods``), never of its name. Module calls per step depend only on the method
and the curriculum stage (the same on every rank), never on the data: ZeRO-3 gathers stay in step.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.latent.attention import pass_kind
from pipeline.latent.batch import Batch
from pipeline.latent.geometry import pairwise_cosine
from pipeline.latent.lean_forward import lean_forward, resolve_body_forward, stack_for
from pipeline.latent.loop import enable_cache_safe_checkpointing, fill_latents
from pipeline.latent.methods import IGNORE, MethodConfig, get_method
from pipeline.latent.reference_quirks import reference_attention, row0_width
from pipeline.latent.stack_key import one_forward


class Projection(nn.Sequential):
    """CODI's ``prj``: Dropout -> Linear -> GELU -> Linear -> LayerNorm (or none), hidden size in and
    out. The dropout is applied functionally so the parameters keep their indices (0, 2, 3) in
    checkpoints and merged models whatever the options."""

    def __init__(self, hidden: int, inner: int | None = None, dropout: float = 0.0, layernorm: bool = True):
        inner = inner or hidden
        super().__init__(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden),
                         nn.LayerNorm(hidden) if layernorm else nn.Identity())
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, self.dropout, self.training) if self.dropout else x)


def labelled_ce(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
                masked: torch.Tensor | None = None):
    """Next-token CE computed only where a label exists: the LM head never sees other positions.
    ``index`` (the collator's ``label_index``: flat positions ``b * T + t`` whose next token is a
    label) selects them without a boolean mask, whose data-dependent size makes a GPU wait for
    the device (one ``nonzero`` sync per call). ``masked``: classes left out of the softmax."""
    if index is None:
        keep = labels[:, 1:] != IGNORE
        return F.cross_entropy(mask_classes(head(hidden[:, :-1][keep]).float(), masked), labels[:, 1:][keep])
    logits = head(hidden.reshape(-1, hidden.size(-1)).index_select(0, index))
    return F.cross_entropy(mask_classes(logits.float(), masked), labels.reshape(-1).index_select(0, index + 1))


def mask_classes(logits: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
    """Logits [N, V] with the ``masked`` classes at -inf: they take no probability and get no
    gradient, exactly as if the LM head had no such rows. In place: the head's matmul does not keep
    its output for backward, and ``.float()`` of a bf16 output is a fresh tensor."""
    if masked is None or masked.numel() == 0:
        return logits
    return logits.index_fill_(-1, masked, float("-inf"))


def distill_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1", div_std: bool = True):
    """CODI's distillation over ``[L+1, B, d]`` hidden states (every layer's output at one token):
    per entry, SmoothL1 (beta 1) or MSE averaged over batch and width, divided by the teacher's std
    over them when ``div_std`` (twice for l2, as the reference does), then averaged over entries."""
    l2 = kind == "l2"
    per_layer = (F.mse_loss if l2 else F.smooth_l1_loss)(student, target, reduction="none").mean(dim=(1, 2))
    if div_std:
        per_layer = per_layer / target.std(dim=(1, 2)) ** (2 if l2 else 1)
    return per_layer.mean()


def _every_slot(step_ids: torch.Tensor, step_embeds: torch.Tensor, lengths: torch.Tensor, slots: int):
    """Step targets padded with masked slots up to the ``slots`` the loop produced: a batch whose rows
    hold fewer latents than it runs has fewer targets, and the decoder still reads every slot (the
    same calls on every rank)."""
    extra = slots - step_ids.size(1)
    if extra < 0:
        raise ValueError(f"{step_ids.size(1)} step targets for {slots} decoder slots")
    if extra == 0:
        return step_ids, step_embeds, lengths
    b, _, width = step_ids.shape
    return (torch.cat([step_ids, step_ids.new_zeros(b, extra, width)], dim=1),
            torch.cat([step_embeds, step_embeds.new_zeros(b, extra, width, step_embeds.size(-1))], dim=1),
            torch.cat([lengths, lengths.new_zeros(b, extra)], dim=1))


class LatentReasoner(nn.Module):
    """``cfg``: the method and its options. ``masked_classes``: token ids the base's LM head never
    scores, the added tokens outside the method's reference vocabulary (``Method.masked_classes``).
    ``decoder_vocab``: the classes of a step decoder copied from the base here (no ``step_decoder``
    given): the vocabulary before the latent tokens were added, as the reference's unresized
    decoder has (None: the base's). ``gradient_checkpointing``: per layer, through the latent
    passes, the KV cache kept. ``body_forward``: how training runs the decoder stacks (the base's in
    every pass, the step decoder's): transformers' model, ``lean`` or ``compiled``
    (``pipeline.latent.lean_forward.resolve_body_forward``; ``auto``: lean where the family allows)."""

    def __init__(self, base: nn.Module, cfg: MethodConfig, eos_id: int | None = None,
                 step_decoder: nn.Module | None = None, masked_classes: Sequence[int] = (),
                 decoder_vocab: int | None = None, gradient_checkpointing: bool = False, body_forward: str = "auto"):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.method = get_method(cfg.name)
        hidden = base.config.hidden_size
        self.projection = (Projection(hidden, cfg.prj_dim or None, cfg.prj_dropout, cfg.prj_layernorm)
                           if self.method.needs_projection and cfg.projection else None)
        # The decoder starts as a copy of the base model's (pretrained) weights, architecture included.
        # Under ZeRO-3 the caller builds it the way it built the base (a deepcopy of partitioned
        # parameters would copy shards, not weights).
        if cfg.simcot and step_decoder is None:
            step_decoder = copy.deepcopy(base)
            if decoder_vocab is not None and decoder_vocab < step_decoder.config.vocab_size:
                step_decoder.resize_token_embeddings(decoder_vocab)
        self.step_decoder = step_decoder if cfg.simcot else None
        self.eos_id = eos_id if eos_id is not None else base.config.eos_token_id
        self.decoder_in = self._decoder_input(hidden)
        # not a parameter, not saved: the method's vocabulary, re-derived wherever the model is built
        self.register_buffer("masked_classes", torch.tensor(sorted(masked_classes), dtype=torch.long),
                             persistent=False)
        self.body_forward = resolve_body_forward(body_forward, base.config)
        self.diagnostics = True     # the latents' collapse diagnostics in forward's output (the trainer: when it logs)
        if gradient_checkpointing:
            for lm in (self.base, self.step_decoder):
                if lm is not None:
                    enable_cache_safe_checkpointing(lm)
        self.train()        # a new module trains; the step decoder's dropout as the method's reference has it

    def _decoder_input(self, hidden: int) -> nn.Linear | None:
        """A step decoder of another model (``model.decoder_path``) reads the base's vectors through a
        learned linear map when the widths differ (the reference's ``pj_in``). Its vocabulary must be
        the base tokenizer's, without the added tokens or with them (the step targets are its ids,
        never an added token's)."""
        if self.step_decoder is None:
            return None
        cfg = self.step_decoder.config
        if cfg.vocab_size > self.base.config.vocab_size or self.eos_id >= cfg.vocab_size:
            raise ValueError(f"the step decoder's vocabulary ({cfg.vocab_size}) is not the base tokenizer's "
                             f"({self.base.config.vocab_size} rows, EOS {self.eos_id}): use a decoder of the same "
                             "tokenizer")
        return nn.Linear(hidden, cfg.hidden_size) if cfg.hidden_size != hidden else None

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; a method whose reference keeps the step decoder in eval mode
        (Coconut: no dropout in it while training) gets a decoder without dropout: every module in
        eval mode but the decoder layers themselves, whose training flag keeps per-layer
        checkpointing on (they hold no dropout of their own)."""
        super().train(mode)
        if mode and self.step_decoder is not None and not self.method.decoder_dropout:
            self.step_decoder.eval()
            for module in self.step_decoder.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True
        return self

    # ------------------------------------------------------------------ pieces
    def attention_passes(self) -> dict[str, tuple]:
        """Each kind of pass a training step runs -> (the config whose attention kernel it calls, its
        decoder stack), for the start-up report (generation's: ``pipeline.inference.generate``)."""
        base = (self.body.config, self.body_forward)
        passes = {kind: base for kind in self.method.pass_kinds(self.cfg)}
        if self.method.needs_teacher:
            passes["teacher"] = base
        if self.step_decoder is not None:
            decoder = self.step_decoder.get_decoder().config
            passes["step_decoder"] = (decoder, stack_for(self.body_forward, decoder))
        return passes

    @property
    def body(self):
        return self.base.get_decoder()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(ids)

    def embed_all(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every token embedding of the step in one lookup: with a 128k vocabulary each lookup's
        backward zero-fills and scatters a dense vocabulary-sized gradient, so one beats three."""
        ids = {k: getattr(batch, k) for k in ("input_ids", "teacher_input_ids", "step_ids")
               if getattr(batch, k) is not None}
        flat = self.embed(torch.cat([v.flatten() for v in ids.values()]))
        out, cursor = {}, 0
        for key, value in ids.items():
            out[key] = flat[cursor:cursor + value.numel()].view(*value.shape, flat.size(-1))
            cursor += value.numel()
        return out

    def _answer_pass(self, batch: Batch, embeds: torch.Tensor):
        n = batch.n_latents if self.method.fills_latents else 0
        if n == 0:
            hidden = self.forward_body(self.body, embeds, batch.attention_mask, batch.position_ids, kind="sequence")[0]
            return hidden, None
        reference = None
        if self.cfg.reference_attention:
            reference = reference_attention(batch.attention_mask, batch.first_latent, embeds.dtype)
        passes = fill_latents(self.body, embeds, batch.attention_mask, batch.position_ids, batch.first_latent, n,
                              project=self.projection, keep_layers_at=batch.distill_index,
                              jacobi_iterations=self.cfg.jacobi, reference=reference,
                              latent_mask=batch.latent_mask(), body_forward=self.body_forward)
        return passes.hidden, passes

    def forward_body(self, body, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                     want_layers: bool = False, kind: str = "sequence") -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decoder stack over whole sequences, uncached -> (last hidden, every layer's hidden states
        stacked [L+1, B, T, d] when ``want_layers``), by ``self.body_forward``; ``kind``: which pass
        (``pipeline.latent.attention.PASS_KINDS``)."""
        stack = stack_for(self.body_forward, body.config)
        with pass_kind(kind):
            if stack != "transformers":
                hidden, _, layers = lean_forward(body, embeds, mask, positions, [], want_layers, stack == "compiled")
                return hidden, layers
            # no cache: a checkpointed layer replayed in backward would append to it a second time
            out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                       output_hidden_states=want_layers)
        return out.last_hidden_state, torch.stack(out.hidden_states, 0) if want_layers else None

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        with one_forward():         # a compiled stack's key taken once per forward (pipeline/latent/stack_key.py)
            return self._losses(batch)

    def _losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        missing = batch.missing(self.method.batch_parts(self.cfg, batch.n_latents))
        if missing:
            raise KeyError(f"{self.method.name} batch lacks {missing}; "
                           "collate it with pipeline.latent.collate.collate_aligned")
        embeds = self.embed_all(batch)
        hidden, passes = self._answer_pass(batch, embeds["input_ids"])
        head = self.base.get_output_embeddings()
        zero = hidden.new_zeros(())
        losses = {"answer_ce": labelled_ce(head, hidden, batch.labels, batch.label_index, self.masked_classes),
                  "teacher_ce": zero,
                  "distill": zero, "step_ce": zero}
        if self.method.needs_teacher:
            losses["teacher_ce"], losses["distill"] = self._teacher(batch, embeds["teacher_input_ids"], passes)
        if self.step_decoder is not None and passes is not None:
            slots = self.method.slot_vectors(self.cfg, passes.latents, passes.next_latent)
            step_ids, step_embeds, lengths = _every_slot(batch.step_ids, embeds["step_ids"], batch.step_lengths,
                                                         slots.size(1))
            losses["step_ce"] = self.step_loss(slots, step_ids, step_embeds, lengths)
        if passes is not None and self.diagnostics:
            losses.update(self.latent_health(passes.latents, embeds["input_ids"], passes.latent_mask))
        c = self.cfg
        losses["total"] = (losses["answer_ce"] + c.teacher_loss_weight * losses["teacher_ce"]
                           + c.distill_factor * losses["distill"] + c.step_loss_weight * losses["step_ce"])
        return losses

    @staticmethod
    @torch.no_grad()
    def latent_health(latents: torch.Tensor, token_embeds: torch.Tensor,
                      latent_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Collapse diagnostics over each row's latents (``latent_mask``; None: all): latent norm
        over token-embedding norm, and the mean pairwise cosine of one problem's latents (1.0 =
        every latent the same direction; problems with fewer than two latents left out, 0 when no
        problem has two)."""
        if latent_mask is None:
            latent_mask = torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)
        real = latent_mask.to(latents.dtype)
        norms = latents.norm(dim=-1)
        ratio = (norms * real).sum() / real.sum().clamp(min=1) / token_embeds.norm(dim=-1).mean().clamp(min=1e-12)
        per_row = pairwise_cosine(latents, latent_mask)
        paired = ~per_row.isnan()
        cosine = per_row.nan_to_num(0.0).sum() / paired.sum().clamp(min=1)
        return {"latent_norm_ratio": ratio, "latent_cosine": cosine}

    def _teacher(self, batch: Batch, embeds: torch.Tensor, passes) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher forward (the reference runs it twice): CE, and detached distillation targets."""
        hidden, layers = self.forward_body(self.body, embeds, batch.teacher_attention_mask,
                                           batch.teacher_position_ids, want_layers=True, kind="teacher")
        teacher_ce = labelled_ce(self.base.get_output_embeddings(), hidden, batch.teacher_labels,
                                 batch.teacher_label_index, self.masked_classes)
        rows = torch.arange(len(batch.teacher_distill_index))
        target = layers[:, rows, batch.teacher_distill_index].detach()                         # [L+1, B, d]
        student = passes.layer_states                                                         # [L+1, B, d]
        return teacher_ce, distill_loss(student, target, self.cfg.distill_loss, self.cfg.distill_div_std)

    def step_loss(self, slots: torch.Tensor, step_ids: torch.Tensor, step_embeds: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
        """One decoder call for every slot of every row: input ``[latents ; embed(step ids)]``,
        labels the step ids then EOS; masked slots (length 0) carry no label."""
        b, s, c, d = slots.shape
        width = step_ids.size(-1)
        ids = step_ids.reshape(b * s, width)
        lengths = lengths.reshape(b * s)
        cols = torch.arange(width + 1, device=ids.device)
        target = torch.cat([ids, ids.new_full((b * s, 1), self.eos_id)], dim=1)
        target = torch.where(cols == lengths[:, None], self.eos_id, target)
        valid = (cols <= lengths[:, None]) & (lengths[:, None] > 0)                  # [BS, width+1]
        if self.cfg.reference_step_truncation:
            valid &= cols < row0_width(lengths.reshape(b, s)).reshape(b * s, 1)
        embeds = torch.cat([slots.reshape(b * s, c, d), step_embeds.reshape(b * s, width, d)], dim=1)
        if self.decoder_in is not None:
            embeds = self.decoder_in(embeds)
        mask = torch.cat([torch.ones(b * s, c, dtype=torch.long, device=ids.device),
                          (cols[:width] < lengths[:, None]).long()], dim=1)
        positions = torch.arange(c + width, device=ids.device).add(self.method.decoder_first_position)
        hidden = self.forward_body(self.step_decoder.get_decoder(), embeds, mask, positions.expand(b * s, -1),
                                   kind="step_decoder")[0]
        # position c-1+j predicts target[j]; the labelled (row, j) found once (one device sync, not three)
        rows, cols = valid.nonzero(as_tuple=True)
        at = rows * hidden.size(1) + (c - 1) + cols
        logits = self.step_decoder.get_output_embeddings()(hidden.reshape(-1, hidden.size(-1)).index_select(0, at))
        token_loss = F.cross_entropy(logits.float(), target[rows, cols], reduction="none")
        slot_of = rows.remainder(s)
        per_slot_sum = torch.zeros(s, device=ids.device).index_add(0, slot_of, token_loss)
        per_slot_tokens = torch.zeros(s, device=ids.device).index_add(0, slot_of, torch.ones_like(token_loss))
        labelled = per_slot_tokens > 0
        if self.cfg.step_loss_norm == "token_mean":
            per_slot = per_slot_sum / per_slot_tokens.clamp(min=1)
            return torch.where(labelled, per_slot, 0).sum() / labelled.sum().clamp(min=1)
        rows_with_labels = (lengths > 0).reshape(b, s).sum(0)
        return (per_slot_sum / rows_with_labels.clamp(min=1)).sum() / s
