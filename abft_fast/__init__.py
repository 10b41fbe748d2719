"""abft-fast: fused attention with probe probabilities for Attention Behavior Fine-Tuning.

``abft_fast.attention`` is the public op (see its docstring); ``abft_fast.hf`` plugs it into
HuggingFace transformers; the ABFT trainer, evaluator and CLI live beside them.
"""
from .attention import BACKENDS, attention

__version__ = "0.1.0"
__all__ = ["attention", "BACKENDS", "__version__"]
