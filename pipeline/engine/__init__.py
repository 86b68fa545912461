"""Training under DeepSpeed: the run config, building the model, the memory plan and ZeRO-3 gather
policy, the sampler, checkpoints, telemetry and the trainer loop (``python -m pipeline.train``)."""
