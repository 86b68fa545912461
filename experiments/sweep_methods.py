"""The sweep's latent methods: their overrides, which run Coconut's curriculum chain, and the
names of their Jacobi variants (shared by the job graph and the report)."""
from __future__ import annotations

# Sweep method -> its overrides on top of the latent runs' common ones (Coconut, c, lr). The step
# decoder starts from the CoT run's weights (decoder_init=base): the tiny model has no pretrained
# weights that can read, and the README's sweep results were recorded so.
_SIMCOT = ["method.simcot=true", "method.decoder_init=base"]
METHODS = {"coconut": [], "simcot": _SIMCOT, "codi-simcot": ["method.name=codi", *_SIMCOT]}
CHAINED = ("coconut", "simcot")     # Coconut's curriculum; CODI has none: each point trains from CoT
JACOBI = "-jacobi"                  # suffix of a method's Jacobi variant (--jacobi T)


def chained(method: str) -> bool:
    """Whether a sweep method (or its Jacobi variant) runs Coconut's curriculum chain."""
    return method.removesuffix(JACOBI) in CHAINED
