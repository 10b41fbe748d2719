"""The op layer: ``attention`` (argument spec, checks, the one engine choice), ``engines`` (one
record per ``backend=``: an output provider with a probe provider), ``probes`` (the probe
providers), ``varlen`` (PyTorch's varlen flash kernel for the output), ``Padding``, the
visibility rule, the float64 reference, the probe maths and one module per backend. Knows nothing
of transformers or ABFT."""
from .attention import BACKENDS, attention, attention_prechecked, choose_backend
from .column_scores import column_scores
from .padding import Padding
from .reference import attention_reference
from .spec import AttentionSpec, make_spec, probs_dtype

__all__ = ["BACKENDS", "AttentionSpec", "Padding", "attention", "attention_prechecked",
           "attention_reference", "choose_backend", "column_scores", "make_spec", "probs_dtype"]
