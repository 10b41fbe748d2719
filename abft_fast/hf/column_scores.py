"""Column-score recording: ``column_scores(model, rows=..., last=...)`` collects, for every layer,
the attention each key receives summed over chosen query rows (:func:`abft_fast.column_scores`)
during one forward or a ``generate()`` prefill of a model running
``attn_implementation="abft_fast"``: the statistics of KV-cache eviction (SnapKV's observation
window, H2O's accumulated attention) without ``output_attentions`` and its L x L matrices.

    import abft_fast.hf as ah
    with ah.column_scores(model, last=32) as rec:      # SnapKV: the last 32 queries
        model(input_ids=ids, attention_mask=am)        # or model.generate(...)
    rec.scores                                         # [num_layers, B, Hq, Lk] float32

Each layer records on its first call inside the context (the prefill); later calls (decode steps
of ``generate()``, a second forward) are not recorded. Scores are statistics: no autograd graph.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..ops.column_scores import column_scores_prechecked
from ..ops.spec import check_index_tensor, check_index_values

__all__ = ["ColumnScoreRecorder", "column_scores", "record_column_scores"]


class ColumnScoreRecorder:
    """Column scores recorded by :func:`column_scores`.

    rows: [B, R] int64 query positions of the prefill (-1 = unused slot) or None; last: the number
    of final query positions to use (when rows is None); both None = every query row.
    """

    def __init__(self, rows: torch.Tensor | None, last: int | None):
        self.rows = rows
        self.last = last
        self.per_layer: list[torch.Tensor] = []  # [B, Hq, Lk] each, in call order
        self.layers: list[int] = []  # layer index of each entry of per_layer
        self._seen: set = set()  # ids of modules that already ran inside the context
        self._checked: set = set()

    @property
    def scores(self) -> torch.Tensor:
        """[num_layers_recorded, B, Hq, Lk] float32 (float64 for float64 models)."""
        if not self.per_layer:
            raise RuntimeError(
                "no attention layer recorded column scores: run the model inside "
                "`with column_scores(...)`, with attn_implementation='abft_fast'")
        shapes = {tuple(p.shape) for p in self.per_layer}
        if len(shapes) != 1:
            raise RuntimeError(f"layers recorded column scores of different shapes "
                               f"{sorted(shapes)}; use rec.per_layer")
        return torch.stack(self.per_layer)

    def _rows(self, b: int, lq: int, device) -> torch.Tensor | None:
        if self.rows is not None:
            if (b, lq) not in self._checked:  # once per shape: the checks synchronise the device
                if self.rows.shape[0] != b:
                    raise ValueError(f"column_scores rows have batch size {self.rows.shape[0]}, "
                                     f"the forward has {b}")
                check_index_values("column_scores rows", self.rows, lq)
                self._checked.add((b, lq))
            return self.rows.to(device)
        if self.last is not None:
            n = min(self.last, lq)
            return torch.arange(lq - n, lq, device=device).expand(b, n)
        return None

    def _record(self, module, query, key, causal, scale, key_padding_mask, window, backend):
        if id(module) in self._seen:  # a decode step (or a second forward): not recorded
            return
        self._seen.add(id(module))
        idx = getattr(module, "layer_idx", None)
        rows = self._rows(query.shape[0], query.shape[2], query.device)
        with torch.no_grad():
            s = column_scores_prechecked(
                query.detach(), key.detach(), rows=rows, causal=causal, scale=scale,
                key_padding_mask=key_padding_mask, window=window,
                backend=backend if backend in ("torch", "triton") else "auto")
        self.layers.append(len(self.layers) if idx is None else int(idx))
        self.per_layer.append(s)


_lock = threading.Lock()
_active: dict[int, list] = {}  # id(attention module) -> the recorders active on its model


def record_column_scores(module, query, key, *, causal, scale, key_padding_mask, window,
                         backend) -> None:
    """Called by the "abft_fast" attention function for every layer call: records when a
    :func:`column_scores` context is active on ``module``'s model (q [B,Hq,Lq,D], k [B,Hkv,Lk,D]
    as the op gets them)."""
    for rec in _active.get(id(module), ()):
        rec._record(module, query, key, causal, scale, key_padding_mask, window, backend)


@contextlib.contextmanager
def column_scores(model: torch.nn.Module, rows: torch.Tensor | None = None, *,
                  last: int | None = None):
    """Record every layer's column scores during one forward or ``generate()``'s prefill.

    Args:
      model: a transformers model using ``attn_implementation="abft_fast"``.
      rows: [B, R] int64 query positions of the prefill (-1 = unused slot; a row listed twice
        counts twice), or None.
      last: with rows None, use the last ``last`` query positions of the prefill (SnapKV's
        observation window; fewer if the prefill is shorter). rows and last both None: every row
        (H2O's accumulated attention).

    Several contexts may be active on one model (e.g. a SnapKV window and H2O's all rows): one
    forward fills them all.

    Yields a :class:`ColumnScoreRecorder`; afterwards ``rec.scores`` is [num_layers, B, Hq, Lk]
    with ``scores[l, b, h, j] = sum_{i in rows} P_l[b, h, i, j]``, Lk the prefill's key length.
    Positions index the padded sequence; padded keys get 0.
    """
    if rows is not None and last is not None:
        raise ValueError("give rows or last, not both")
    if rows is not None:
        rows = check_index_tensor("rows", rows, strict_dtype=False)
        check_index_values("rows", rows, None)
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ValueError(f"last must be a positive int or None, got {last!r}")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != "abft_fast":
        raise ValueError(
            f"column_scores() needs a model running attn_implementation='abft_fast', this one "
            f"uses {impl!r}: load it with attn_implementation='abft_fast' or call "
            "model.set_attn_implementation('abft_fast') (after `import abft_fast.hf`)")
    rec = ColumnScoreRecorder(rows, last)
    ids = [id(m) for m in model.modules()]
    with _lock:
        for i in ids:
            _active.setdefault(i, []).append(rec)
    try:
        yield rec
    finally:
        with _lock:
            for i in ids:
                recs = _active.get(i, [])
                if rec in recs:
                    recs.remove(rec)
                if not recs:
                    _active.pop(i, None)
