"""The fidelity seam of the Coconut golden fixture: the reference Coconut's latent-filling forward
for any HF causal LM, written over this pipeline's latent loop (tests only)."""
from __future__ import annotations

import torch.nn.functional as F

from pipeline.latent.loop import fill_latents, latent_block


def coconut_forward(model, input_ids, attention_mask, position_ids, labels, latent_id):
    """Fidelity seam: Coconut's latent-filling forward for any HF causal LM -> (loss, logits).

    ``logits`` covers every column, as the reference returns it; ``loss`` is the mean next-token
    cross-entropy over labelled positions.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    embeds = model.get_input_embeddings()(input_ids)
    first, n, mask = latent_block(input_ids, latent_id)
    if n == 0:
        hidden = body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    else:
        hidden = fill_latents(body, embeds, attention_mask, position_ids, first, n, latent_mask=mask).hidden
    logits = head(hidden)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss, logits
