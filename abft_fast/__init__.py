"""abft-fast: fused attention with probe probabilities for Attention Behavior Fine-Tuning.

Three layers, each a subpackage, lower never importing upper (checked by ``lint-imports``):

- ``abft_fast.ops``: the op ``attention`` (spec and checks, masks, float64 reference, probe
  maths, the torch / sdpa / triton / cuda backends, torch.library registration);
- ``abft_fast.hf``: the HuggingFace transformers integration (``attn_implementation="abft_fast"``,
  mask translation, probe recorder, packaged offline models);
- ``abft_fast.abft``: the ABFT method (data, loss, PID, trainer, evaluation, plots, CLI).

``abft_fast.kernels`` (Triton) and ``abft_fast.csrc`` (CUDA C++) sit below the op layer.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from ._version import __version__
from .ops import BACKENDS, Padding, attention, column_scores

__all__ = ["attention", "BACKENDS", "Padding", "column_scores", "__version__"]

# Module paths of abft-fast 0.1 (one flat package), kept importable: ``import abft_fast.models``
# gives ``abft_fast.hf.packaged`` with a DeprecationWarning.
_MOVED = {
    "abft_fast.models": "abft_fast.hf.packaged",
    "abft_fast.reference": "abft_fast.ops.reference",
    "abft_fast.masks": "abft_fast.ops.masks",
    "abft_fast.probe_math": "abft_fast.ops.probe_math",
    "abft_fast.torch_backend": "abft_fast.ops.torch_backend",
    "abft_fast.triton_backend": "abft_fast.ops.triton_backend",
    "abft_fast.cuda_backend": "abft_fast.ops.cuda_backend",
    "abft_fast.data": "abft_fast.abft.data",
    "abft_fast.loss": "abft_fast.abft.loss",
    "abft_fast.pid": "abft_fast.abft.pid",
    "abft_fast.trainer": "abft_fast.abft.trainer",
    "abft_fast.evaluate": "abft_fast.abft.evaluate",
    "abft_fast.plots": "abft_fast.abft.plots",
    "abft_fast.cli": "abft_fast.abft.cli",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in _MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = _MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
