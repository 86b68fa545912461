"""The sweep's latent methods: their overrides, which run Coconut's curriculum chain, and the
names of their Jacobi variants (shared by the job graph and the report)."""
from __future__ import annotations

# Sweep method -> its overrides on top of the latent runs' common ones (Coconut, c, lr).
METHODS = {"coconut": [], "simcot": ["method.simcot=true"], "codi-simcot": ["method.name=codi", "method.simcot=true"]}
CHAINED = ("coconut", "simcot")     # Coconut's curriculum; CODI has none: each point trains from CoT
JACOBI = "-jacobi"                  # suffix of a method's Jacobi variant (--jacobi T)


def chained(method: str) -> bool:
    """Whether a sweep method (or its Jacobi variant) runs Coconut's curriculum chain."""
    return method.removesuffix(JACOBI) in CHAINED
