"""Inference with a merged model: batched latent generation, answer scoring and the evaluation
report (``python -m pipeline.evaluate``)."""
