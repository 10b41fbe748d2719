"""End-to-end ABFT training step on Llama-architecture models with random weights.

One step = forward up to the last probed layer's attention (the rest of the model is skipped),
ABFT probe loss (abft_fast.abft.loss.abft_loss: probe row = last token, columns = k = 4 label
positions, all heads counted), backward, Adam step on W_Q / W_K only. Methods:
  abft_auto / abft_varlen / abft_triton / abft_cuda / abft_torch  attn_implementation
      "abft_fast" (abft_fast.hf.probe) on that backend.
  eager  attn_implementation "eager" with output_attentions=True (the paper's way): the full
      L x L probabilities of every layer, probes gathered from them.
  sdpa_recompute  HF's SDPA attention for the output, plus the probe rows recomputed on the side
      from the layer's q / k (abft_fast.ops.torch_backend.probe_probs).
Shapes "-padded": a right-padded batch of B prompts (real lengths 50-100% of L, random tokens), as
ABFT trains on; tokens/s counts the padded B x L. Reports tokens/s (from the median wall time of a
step) and peak memory (max_memory_allocated over
the timed steps, weights included); on CUDA also event_ms (GPU time of whole steps, Adam
included, by CUDA events) and graph_ms (forward + loss + backward captured in a CUDA graph and
replayed; the Adam step stays outside the graph: torch's default Adam cannot be captured), or
empty with graph_reason when capture fails.
An out-of-memory L is recorded as status "oom" and the method's longer L are skipped, so the
longest L that fits is the last "ok" row.
"""
from __future__ import annotations

import contextlib
import time

import benchlib
import pytest
import torch

SDPA_PROBE = "abft_bench_sdpa_probe"
_state = {"key": None, "model": None}  # the model of the current (name, dtype), reused across L
_first_oom: dict = {}                   # (model, method) -> first L that ran out of memory
_capture: list = []                     # probe sink of the sdpa_recompute attention function
_capture_mask: list = [None]            # the 2-D padding mask of the batch it runs


class _Stop(Exception):
    """Raised after the last attention layer: the rest of the forward is not needed."""


def _hf():
    try:
        import abft_fast.hf as ah
        from abft_fast.abft.loss import abft_loss
        return ah, abft_loss
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"abft_fast.hf / abft_fast.abft.loss not importable yet: {type(e).__name__}: {e}")


def _register_sdpa_probe():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    from abft_fast.ops.spec import make_spec
    from abft_fast.ops.torch_backend import probe_probs

    def attention(module, query, key, value, attention_mask, scaling=None, **kw):
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                     **kw)
        if _capture:
            rows, cols, sink = _capture[-1]
            kpm = None if _capture_mask[-1] is None else _capture_mask[-1].bool()
            spec = make_spec(query, key, value, causal=True, scale=scaling, key_padding_mask=kpm,
                             window=None, probe_rows=rows, probe_cols=cols)
            sink.append(probe_probs(query, key, spec))
        return out

    AttentionInterface.register(SDPA_PROBE, attention)
    AttentionMaskInterface.register(SDPA_PROBE, AttentionMaskInterface._global_mapping["sdpa"])


def _model(s: benchlib.E2EShape, dev):
    key = (s.model, s.dtype)
    if _state["key"] != key:
        _state["model"] = None
        benchlib.free_memory()
        from transformers import AutoModelForCausalLM, LlamaConfig
        cfg = LlamaConfig(**benchlib.LLAMA_CONFIGS[s.model], max_position_embeddings=131072,
                          rope_theta=500000.0)
        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                     dtype=benchlib.DTYPES[s.dtype])
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(("q_proj.weight", "k_proj.weight")))
        _state["key"], _state["model"] = key, model
    return _state["model"]


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")
            and hasattr(m, "q_proj")]


@contextlib.contextmanager
def _hooks(mods, fn_each=None):
    """Forward hooks: fn_each(module, output) on every attention module; stop after the last."""
    def stop(*_):
        raise _Stop
    hs = [m.register_forward_hook(fn_each) for m in mods] if fn_each else []
    hs.append(mods[-1].register_forward_hook(stop))
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _run_to_last_attention(model, ids, **kw):
    try:
        model(input_ids=ids, use_cache=False, **kw)
    except _Stop:
        pass


def probe_forward(method, model):
    """fn(ids, rows, cols, am=None) -> probe probabilities [layers, B, Hq, R, C] for ``method``
    (am: the [B, L] padding mask of a padded batch)."""
    ah, _ = _hf()
    mods = _attention_modules(model)
    if method.startswith("abft_"):
        model.set_attn_implementation(ah.NAME)
        ah.set_backend(method[5:])

        def fn(ids, rows, cols, am=None):
            with ah.probe(model, rows=rows, cols=cols) as rec, _hooks(mods):
                _run_to_last_attention(model, ids, attention_mask=am)
            return rec.probs
    elif method == "eager":
        model.set_attn_implementation("eager")

        def fn(ids, rows, cols, am=None):
            got = []

            def take(_m, _inp, out):
                p = out[1]  # [B, Hq, L, L] attention probabilities
                b, h, _, lk = p.shape
                pr = torch.gather(p, 2, rows[:, None, :, None].expand(b, h, rows.shape[1], lk))
                got.append(torch.gather(pr, 3, cols[:, None, None, :].expand(
                    b, h, rows.shape[1], cols.shape[1])).float())
            with _hooks(mods, take):
                _run_to_last_attention(model, ids, output_attentions=True, attention_mask=am)
            return torch.stack(got)
    elif method == "sdpa_recompute":
        _register_sdpa_probe()
        model.set_attn_implementation(SDPA_PROBE)

        def fn(ids, rows, cols, am=None):
            sink = []
            _capture.append((rows, cols, sink))
            _capture_mask.append(am)
            try:
                with _hooks(mods):
                    _run_to_last_attention(model, ids, attention_mask=am)
            finally:
                _capture.pop()
                _capture_mask.pop()
            return torch.stack(sink)
    else:
        raise ValueError(method)
    return fn


def make_batch(s: benchlib.E2EShape, vocab, dev):
    """Random tokens; probe row = last real token; columns = k label positions spread over the
    prompt, alternately correct / wrong. Padded shapes: right padding (as ABFT's collate), real
    lengths uniform in [L/2, L], the longest L. Returns (ids, rows, cols, correct, valid,
    lengths, am or None)."""
    g = torch.Generator().manual_seed(s.L)
    ids = torch.randint(0, vocab, (s.B, s.L), generator=g)
    n = torch.full((s.B,), s.L, dtype=torch.long)
    am = None
    if s.padded:
        n = torch.randint(s.L // 2, s.L + 1, (s.B,), generator=g)
        n[0] = s.L
        am = (torch.arange(s.L)[None, :] < n[:, None]).long()
        ids = ids * am
    rows = (n - 1).unsqueeze(1)
    cols = torch.stack([(torch.arange(1, s.k + 1) * (m - 1)) // (s.k + 1) for m in n.tolist()])
    correct = (torch.arange(s.k) % 2 == 0).repeat(s.B, 1)
    valid = torch.ones_like(correct)
    out = [t.to(dev) for t in (ids, rows, cols, correct, valid, n)]
    return (*out, None if am is None else am.to(dev))


def test_abft_step(e2e_case, benchmark, recorder):
    method, s = e2e_case
    dev = benchlib.device()
    ah, abft_loss = _hf()
    if method == "abft_cuda" and dev.type != "cuda":
        pytest.skip("abft_fast backend 'cuda' needs a CUDA GPU")
    if method == "abft_varlen" and (dev.type != "cuda" or s.dtype == "fp32"):
        pytest.skip("abft_fast backend 'varlen' needs a CUDA GPU and 16-bit weights")
    first = _first_oom.get((s.model, method))
    if first is not None and s.L > first:
        pytest.skip(f"{method} ran out of memory at L={first} already")
    benchmark.group = f"e2e {s.id}"
    benchlib.free_memory()
    row = dict(model=s.model, method=method, dtype=s.dtype, B=s.B, L=s.L, status="ok",
               note="right-padded, real lengths 50-100% of L" if s.padded else "")
    oom = False
    try:
        model = _model(s, dev)
        nl = model.config.num_hidden_layers
        row.update(layers=nl, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
        fwd = probe_forward(method, model)
        ids, rows, cols, correct, valid, lengths, am = make_batch(s, model.config.vocab_size,
                                                                  dev)
        qk = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(qk, lr=2e-5)
        other = next(p for n, p in model.named_parameters() if n.endswith("v_proj.weight"))
        before = [qk[0].detach().clone(), other.detach().clone()]
        out = {}

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            probs = fwd(ids, rows, cols, am)
            loss = abft_loss(probs, correct, valid, lengths, A=0.5, B=1.0,
                             use_filter=False).loss
            loss.backward()
            return probs, loss

        def work():  # one step without host synchronisation (CUDA events)
            fwd_bwd()
            opt.step()

        def step():
            probs, loss = fwd_bwd()
            opt.step()
            benchlib.sync(dev)
            out.update(probs_shape=tuple(probs.shape), loss=loss.detach())
            return loss

        if recorder.timing:
            t0 = time.perf_counter()
            step()  # first step: compile / autotune, Adam state; outside the timing
            t = time.perf_counter() - t0
            if t < 5.0:  # the first step may be mostly compilation: time a second one
                t = benchlib.wall(step, dev)
            rounds = benchlib.rounds_for(t, "ABFT_BENCH_E2E_SECONDS", 5.0, 2, 20)
        else:
            rounds = 1
        _, stats = benchlib.timed_pedantic(benchmark, step, None, dev, rounds, warmup_rounds=0)
        if stats and dev.type == "cuda":  # GPU time: events around steps, graph of fwd + bwd
            row["event_ms"] = benchlib.event_ms(work, dev, rounds, warmup=1)
            row["graph_ms"], row["graph_reason"] = benchlib.graph_ms(
                fwd_bwd, dev, rounds, warmup=1, cleanup=lambda: opt.zero_grad(set_to_none=True))
        hq = model.config.num_attention_heads
        assert out["probs_shape"] == (nl, s.B, hq, 1, s.k), out["probs_shape"]
        assert torch.isfinite(out["loss"]), "non-finite ABFT loss"
        if recorder.sizes == "smoke":  # float32: the q/k update is visible, v is frozen
            assert not torch.equal(before[0], qk[0].detach()), "W_Q/W_K did not move"
            assert torch.equal(before[1], other.detach()), "a frozen weight moved"
        del opt, qk, before, other
    except RuntimeError as e:
        if not benchlib.is_oom(e):
            raise
        oom = True
    finally:
        ah.set_backend("auto")
        if _state["model"] is not None:
            for p in _state["model"].parameters():
                p.grad = None
    if oom:
        _first_oom[(s.model, method)] = s.L
        opt = step = fwd = None  # noqa: F841  (drop the references before freeing memory)
        qk = before = other = None  # noqa: F841
        benchlib.free_memory()
        recorder.add("e2e", **{**row, "status": "oom"})
        pytest.skip(f"out of memory: {method} {s.id}")
    if stats:
        row.update(ms=stats["ms"], ms_min=stats["ms_min"], rounds=stats["rounds"],
                   tokens_per_s=s.B * s.L / (stats["ms"] * 1e-3), peak_mem_mb=stats["peak_mem_mb"])
        benchmark.extra_info.update({k: v for k, v in row.items() if v != ""})
        recorder.add("e2e", **row)


def test_e2e_methods_agree(recorder):
    """Smoke sizes: every method's probes equal the eager ones on the same model and input."""
    if recorder.sizes != "smoke":
        pytest.skip("agreement is checked at smoke sizes only")
    ah, _ = _hf()
    dev = benchlib.device()
    for padded in (False, True):
        s = benchlib.E2EShape("tiny", "fp32", 3, 32, padded=padded)
        model = _model(s, dev)
        ids, rows, cols, *_, am = make_batch(s, model.config.vocab_size, dev)
        ref = probe_forward("eager", model)(ids, rows, cols, am)
        tol = 1e-2 if dev.type == "cuda" else 1e-5
        for m in ("abft_torch", "abft_triton", "sdpa_recompute") + (
                ("abft_cuda", "abft_varlen") if dev.type == "cuda" else ()):
            if m == "abft_varlen" and not padded:
                continue
            try:
                got = probe_forward(m, model)(ids, rows, cols, am)
            finally:
                ah.set_backend("auto")
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol,
                                       msg=lambda x, m=m, p=padded: f"{m} padded={p}: {x}")
