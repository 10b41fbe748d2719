"""attn_implementation="abft_fast" on tiny random models vs transformers' eager / sdpa attention.

Families: Llama (GQA), Qwen2 (a full and a sliding-window layer), Mistral (sliding window),
Gemma3 text (sliding + full layers, query_pre_attn_scalar scaling), GPT-2. Left and right padding;
windows shorter than the padded batch so that padding, window and cache offsets interact.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from cases import expected_probes
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import abft_fast.hf as ah

V, B, L = 61, 3, 11
WINDOW = 4
PAD = (0, 3, 6)  # pad tokens per sample; sample 2 has more pad tokens than the window
common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(**common),
    "qwen2": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1),  # layer 0 full, layer 1 sliding
    "mistral": lambda: MistralConfig(**common, sliding_window=WINDOW),
    "gemma3": lambda: Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=20,
                                       sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention"]),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               initializer_range=0.3, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2),
}
FAMILIES = list(CONFIGS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matrices: thread start-up and contention cost far more than the maths on a busy CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def torch_backend():
    old = ah.get_backend()
    ah.set_backend("torch")
    yield
    ah.set_backend(old)


def models(family, ref_impl="eager", seed=0):
    """(reference model, abft_fast model) with identical random weights, in eval mode."""
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=ref_impl)
    m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="abft_fast")
    m.load_state_dict(ref.state_dict())
    assert m.config._attn_implementation == "abft_fast"
    return ref.eval(), m.eval()


def batch(padding, seed=1, length=L):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, length), generator=g)
    am = torch.ones(B, length, dtype=torch.long)
    for b, n in enumerate(PAD):
        if n:
            sl = slice(0, n) if padding == "left" else slice(length - n, length)
            am[b, sl] = 0
            ids[b, sl] = 0
    return ids, am


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(g_ref, g, rtol=2e-4, atol=1e-5):
    """Same gradients (a parameter without .grad counts as a zero gradient)."""
    assert len(g_ref) > 0
    for n in g_ref.keys() | g.keys():
        if n not in g_ref or n not in g:
            present = g_ref.get(n, g.get(n))
            assert not present.any(), f"grad of {n} only on one side and non-zero"
            continue
        scale = g_ref[n].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(g[n] / scale, g_ref[n] / scale, rtol=rtol, atol=atol,
                                   msg=lambda s, n=n: f"grad of {n}: {s}")


CASES = [(f, "eager", p) for f in FAMILIES for p in ("left", "right")]
CASES += [("llama-gqa", "sdpa", p) for p in ("left", "right")] + [("gpt2", "sdpa", "left")]


@pytest.mark.parametrize("family,ref_impl,padding", CASES)
def test_logits_and_grads_match(family, ref_impl, padding):
    ref, m = models(family, ref_impl)
    ids, am = batch(padding)
    real = am.bool()
    w = torch.randn(B, L, V) * real[..., None]
    lr = ref(input_ids=ids, attention_mask=am).logits
    la = m(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(la[real], lr[real], rtol=1e-4, atol=1e-5)
    (lr * w).sum().backward()
    (la * w).sum().backward()
    assert_grads_close(grads(ref), grads(m))


def probe_positions(am, full_cols, seed=2):
    """rows [B, 3]: last real token, a random real token, -1; cols [B, 5] or None."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = [], []
    for b in range(B):
        real = am[b].nonzero().flatten()
        pad = (am[b] == 0).nonzero().flatten()
        rows.append([int(real[-1]), int(real[torch.randint(len(real), (1,), generator=g)]), -1])
        c = real[torch.randint(len(real), (3,), generator=g)].tolist()
        c.append(int(pad[0]) if len(pad) else int(real[0]))  # a pad key gives probability 0
        c.append(-1)
        cols.append(c)
    return torch.tensor(rows), None if full_cols else torch.tensor(cols)


@pytest.mark.parametrize("full_cols", [False, True], ids=["cols", "fullrows"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_probes_match_eager_attentions(family, padding, full_cols):
    ref, m = models(family)
    ids, am = batch(padding)
    rows, cols = probe_positions(am, full_cols)
    with ah.probe(m, rows=rows, cols=cols) as rec:
        m(input_ids=ids, attention_mask=am)
    n_layers = m.config.num_hidden_layers
    c = L if full_cols else cols.shape[1]
    assert rec.layers == list(range(n_layers))
    assert rec.probs.shape == (n_layers, B, 4, rows.shape[1], c)
    assert rec.probs.dtype == torch.float32 and rec.probs.requires_grad
    want = expected_probes(ref(input_ids=ids, attention_mask=am, output_attentions=True).attentions,
                           rows, cols)
    torch.testing.assert_close(rec.probs, want, rtol=1e-4, atol=1e-6)
    assert float(want.detach().abs().sum()) > 0
    # a loss on the probes trains the model exactly as the same loss through eager attentions
    w = torch.randn(want.shape)
    (want * w).sum().backward()
    (rec.probs * w).sum().backward()
    assert_grads_close(grads(ref), grads(m))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_eager(family):
    ref, m = models(family)
    ids, am = batch("left")
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kw)
    got = m.generate(ids, **kw)
    assert got.shape == (B, L + 6)
    assert torch.equal(got, want)


def test_decode_step_logits_match():
    """One cached decode step (Lq = 1 < Lk), through a sliding-window cache, vs eager."""
    ref, m = models("gemma3")
    ids, am = batch("left")
    step = torch.randint(3, V, (B, 1))
    am2 = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], 1)
    outs = []
    for model in (ref, m):
        pkv = model(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
        outs.append(model(input_ids=step, attention_mask=am2, past_key_values=pkv).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_static_cache_generate_matches_eager():
    ref, m = models("llama-gqa")
    ids, am = batch("left")
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    assert torch.equal(m.generate(ids, **kw), ref.generate(ids, **kw))


def test_dense_4d_padding_causal_mask_is_read_exactly():
    """A 4-D mask (bool or additive float) that is padding x causal gives the 2-D mask's logits."""
    ref, m = models("llama-gqa")
    ids, am = batch("left")
    want = ref(input_ids=ids, attention_mask=am).logits
    vis = torch.ones(L, L, dtype=torch.bool).tril()[None] & am.bool()[:, None, :]  # [B, L, L]
    real = am.bool()
    for mask4 in (vis[:, None], torch.zeros(B, 1, L, L).masked_fill(~vis[:, None], float("-inf"))):
        got = m(input_ids=ids, attention_mask=mask4).logits
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_set_attn_implementation_switches_a_loaded_model():
    ref, _ = models("llama-gqa")
    if not hasattr(ref, "set_attn_implementation"):
        pytest.skip("this transformers has no PreTrainedModel.set_attn_implementation")
    m = copy.deepcopy(ref)
    m.set_attn_implementation("abft_fast")
    ids, am = batch("right")
    with ah.probe(m, rows=torch.full((B, 1), L - 1)) as rec:
        out = m(input_ids=ids, attention_mask=am).logits
    assert rec.probs.shape == (2, B, 4, 1, L)
    real = am.bool()
    torch.testing.assert_close(out[real], ref(input_ids=ids, attention_mask=am).logits[real],
                               rtol=1e-4, atol=1e-5)


def test_probe_early_stop_records_layers_that_ran():
    _, m = models("llama-gqa")
    ids, am = batch("left")
    m.model.layers[1].self_attn.register_forward_pre_hook(
        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # stop before layer 1
    with ah.probe(m, rows=torch.full((B, 1), L - 1)) as rec:
        with pytest.raises(KeyboardInterrupt):
            m(input_ids=ids, attention_mask=am)
    assert rec.layers == [0] and rec.probs.shape == (1, B, 4, 1, L)


def test_probe_argument_errors():
    ref, m = models("llama-gqa")
    ids, am = batch("left")
    with pytest.raises(ValueError, match="attn_implementation='abft_fast'"):
        with ah.probe(ref, rows=torch.zeros(B, 1, dtype=torch.long)):
            pass
    with pytest.raises(TypeError, match="integer"):
        with ah.probe(m, rows=torch.zeros(B, 1)):
            pass
    with pytest.raises(ValueError, match="batch size"):
        with ah.probe(m, rows=torch.zeros(B, 1, dtype=torch.long),
                      cols=torch.zeros(B + 1, 2, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="probe rows have batch size 2"):
        with ah.probe(m, rows=torch.zeros(2, 1, dtype=torch.long)):
            m(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match=rf"probe rows values must lie in \[-1, {L}\)"):
        with ah.probe(m, rows=torch.full((B, 1), L)):
            m(input_ids=ids, attention_mask=am)
    with pytest.raises(RuntimeError, match="ran twice"):
        with ah.probe(m, rows=torch.zeros(B, 1, dtype=torch.long)):
            m(input_ids=ids, attention_mask=am)
            m(input_ids=ids, attention_mask=am)
    with pytest.raises(RuntimeError, match="already active"):
        with ah.probe(m, rows=torch.zeros(B, 1, dtype=torch.long)):
            with ah.probe(m, rows=torch.zeros(B, 1, dtype=torch.long)):
                pass
    # after the errors the model records again
    with ah.probe(m, rows=torch.zeros(B, 1, dtype=torch.long)) as rec:
        m(input_ids=ids, attention_mask=am)
    assert rec.probs.shape[0] == 2


def test_refuses_what_it_cannot_do():
    ref, m = models("llama-gqa")
    ids, am = batch("left")
    with pytest.raises(ValueError, match="output_attentions"):
        m(input_ids=ids, attention_mask=am, output_attentions=True)
    # a precomputed 4-D mask is never silently dropped: one that is not padding x causal is refused
    mask4 = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(0)) > 0.5
    with pytest.raises(ValueError, match="4-D mask .* not a key padding mask"):
        m(input_ids=ids, attention_mask=mask4)
    bias = torch.zeros(B, 1, L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -1e30)
    with pytest.raises(ValueError, match="additive biases"):
        m(input_ids=ids, attention_mask=bias - 1.0)
    # packed sequences (restarting position_ids, no attention_mask) need a block-diagonal mask
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]).expand(B, -1)
    with pytest.raises(ValueError, match="packed sequences"):
        m(input_ids=ids, position_ids=pos, use_cache=False)
    # attention dropout in training
    _, g = models("gpt2")
    g.config.attn_pdrop = 0.1
    for blk in g.transformer.h:
        blk.attn.attn_dropout.p = 0.1
    g.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        g(input_ids=ids, attention_mask=am)
    g.eval()
    g(input_ids=ids, attention_mask=am)  # fine in eval mode
    attn = m.model.layers[0].self_attn
    q = torch.randn(B, 4, L, 8)
    k = torch.randn(B, 2, L, 8)
    with pytest.raises(NotImplementedError, match="head_mask"):
        ah.attention_forward(attn, q, k, k, None, head_mask=torch.ones(4))
    with pytest.raises(NotImplementedError, match="soft-capping"):
        ah.attention_forward(attn, q, k, k, None, softcap=50.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ah.set_backend("nope")


def test_refuses_cross_attention():
    torch.manual_seed(0)
    cfg = CONFIGS["gpt2"]()
    cfg.add_cross_attention = True
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="abft_fast").eval()
    ids, am = batch("right")
    with pytest.raises(NotImplementedError, match="cross-attention"):
        m(input_ids=ids, attention_mask=am, encoder_hidden_states=torch.randn(B, 5, 32))


def test_mask_function_recognition():
    from transformers import masking_utils as mu
    assert ah.describe_mask_function(mu.causal_mask_function) == (True, None)
    assert ah.describe_mask_function(mu.sliding_window_causal_mask_function(5)) == (True, 5)
    if hasattr(mu, "bidirectional_mask_function"):  # transformers >= 5
        assert ah.describe_mask_function(mu.bidirectional_mask_function) == (False, None)
    try:
        chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=int))
    except TypeError:  # transformers 4.5x: chunk size only
        chunked = mu.chunked_causal_mask_function(4)
    with pytest.raises(ah.UnsupportedMaskError, match="chunked"):
        ah.describe_mask_function(chunked)
    with pytest.raises(ah.UnsupportedMaskError):
        ah.describe_mask_function(mu.or_masks(mu.causal_mask_function, lambda *a: True))
    # padding is sliced by absolute key position (sliding caches pass kv_offset > 0)
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mk = ah.mask_builder(2, 1, 4, q_offset=5, kv_offset=2, attention_mask=am.bool(),
                         mask_function=mu.sliding_window_causal_mask_function(4))
    assert (mk.causal, mk.window, mk.key_padding_mask) == (True, 4, None)
    mk = ah.mask_builder(2, 1, 4, q_offset=4, kv_offset=1, attention_mask=am.bool())
    assert mk.key_padding_mask.tolist() == [[False, True, True, True], [True] * 4]


@pytest.mark.skipif(importlib.util.find_spec("abft_fast.ops.triton_backend") is None,
                    reason="abft_fast.ops.triton_backend is not there yet")
def test_triton_backend_matches_eager():
    pytest.importorskip("triton")
    from abft_fast.ops.attention import triton_available
    ok, why = triton_available(torch.empty(0).device)
    if not ok:
        pytest.skip(why)
    ah.set_backend("triton")
    cfg = dict(common, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
               num_key_value_heads=1)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(MistralConfig(**cfg, sliding_window=WINDOW),
                                           attn_implementation="eager").eval()
    m = AutoModelForCausalLM.from_config(MistralConfig(**cfg, sliding_window=WINDOW),
                                         attn_implementation="abft_fast").eval()
    m.load_state_dict(ref.state_dict())
    ids, am = batch("left", length=8)
    rows = torch.tensor([[7, 5], [7, -1], [7, 6]])
    cols = torch.tensor([[0, 3, 6], [4, 7, -1], [6, 7, 2]])
    with ah.probe(m, rows=rows, cols=cols) as rec:
        la = m(input_ids=ids, attention_mask=am).logits
    out = ref(input_ids=ids, attention_mask=am, output_attentions=True)
    real = am.bool()
    torch.testing.assert_close(la[real], out.logits[real], rtol=1e-4, atol=1e-5)
    want = expected_probes(out.attentions, rows, cols)
    torch.testing.assert_close(rec.probs, want, rtol=1e-4, atol=1e-6)
    w = torch.randn(want.shape)
    (want * w).sum().backward()
    (rec.probs * w).sum().backward()
    assert_grads_close(grads(ref), grads(m))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_probed_forward_does_not_sync_per_layer(backend):
    """The probe indices are validated once per probe context and shape, not in every layer:
    a probed forward of an 8-layer model makes fewer host syncs than it has layers."""
    import warnings
    ah.set_backend(backend)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(LlamaConfig(**dict(common, num_hidden_layers=8)),
                                         attn_implementation="abft_fast").cuda().eval()
    ids, am = batch("left")
    ids, am = ids.cuda(), am.cuda()
    rows, cols = probe_positions(am.cpu(), full_cols=False)
    rows, cols = rows.cuda(), cols.cuda()
    with ah.probe(m, rows=rows, cols=cols) as rec:
        m(input_ids=ids, attention_mask=am)  # warm-up: compiles, validates this shape once
        rec.per_layer.clear()
        rec.layers.clear()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                m(input_ids=ids, attention_mask=am)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [x for x in w if "synchroniz" in str(x.message)]
    assert len(rec.layers) == 8
    assert len(syncs) < 8, [str(x.message) for x in syncs]


@pytest.mark.parametrize("backend", ["varlen", "auto"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["llama-gqa", "gemma3", "qwen2"])
def test_varlen_preset_matches_eager(family, padding, backend, monkeypatch):
    """set_backend("varlen"), or "auto" with its GPU order: every layer's output from the varlen
    layout (the naive kernel standing in for PyTorch's flash varlen on a CPU, in float32), probes
    from the probe kernels; logits at real positions, probes and gradients equal eager. The mask
    builder's Padding (read once per forward, padded query rows zeroed) is what makes right
    padding exact and lets auto route there."""
    import dataclasses
    import importlib

    from abft_fast.ops import varlen
    A = importlib.import_module("abft_fast.ops.attention")
    ran = []
    engine = A.ENGINES["varlen"]

    def spy(*a):
        ran.append(1)
        return engine.run(*a)
    monkeypatch.setitem(A.ENGINES, "varlen", dataclasses.replace(engine, run=spy))
    if backend == "auto":
        monkeypatch.setattr(A, "choose_backend", lambda d, t, s: (
            ["torch"] if s.key_padding_mask is None and s.window is None
            else ["varlen", "triton", "torch"]))
    varlen.use_naive_kernel()
    ah.set_backend(backend)
    try:
        ref, m = models(family)
        ids, am = batch(padding)
        real = am.bool()
        rows, cols = probe_positions(am, False)
        w = torch.randn(B, L, V) * real[..., None]
        with ah.probe(m, rows=rows, cols=cols) as rec:
            la = m(input_ids=ids, attention_mask=am).logits
        out = ref(input_ids=ids, attention_mask=am, output_attentions=True)
        torch.testing.assert_close(la[real], out.logits[real], rtol=1e-4, atol=1e-5)
        want = expected_probes(out.attentions, rows, cols)
        torch.testing.assert_close(rec.probs, want, rtol=1e-4, atol=1e-6)
        wp = torch.randn(want.shape)
        ((out.logits * w).sum() + (want * wp).sum()).backward()
        ((la * w).sum() + (rec.probs * wp).sum()).backward()
        assert_grads_close(grads(ref), grads(m))
        assert len(ran) == m.config.num_hidden_layers  # every (padded) layer went to varlen
    finally:
        varlen.reset_kernel()
