"""Stages 2-3: latent-reasoning training, merge and evaluation (``python -m pipeline.<stage> --help``)."""
