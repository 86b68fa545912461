"""The latent model: methods (layouts, prompts, curricula), collation, the one latent loop, the
reasoner (base LM + projection + SIM-CoT step decoder) and latent diagnostics. No DeepSpeed here."""
