"""Experiments built on the pipeline's CLIs: the demo (``python -m experiments.demo``), the toy
latent-scaling sweep (``python -m experiments.sweep``), the SmolLM2 study
(``python -m experiments.real_model``) and the resumable job graph they run on."""
