"""The method registry: ``get_method(name)`` -> the object that owns a method's layout, prompt,
curriculum, decoder slots and the parts it needs. One module per method; importing this package
registers them all.

    from pipeline.latent.methods import MethodConfig, get_method, layout
    example = layout(record, special_tokens, MethodConfig("codi", num_latent=6, simcot=True), prefix_ids=ids)
"""
from . import coconut, codi, cot, nocot, nothought, pause  # noqa: F401  (each registers itself)
from .base import IGNORE, Example, Method, SequenceShape, get_method, layout, method_names
from .config import MethodConfig

__all__ = ["IGNORE", "Example", "Method", "MethodConfig", "SequenceShape", "get_method", "layout", "method_names"]
