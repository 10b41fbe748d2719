"""abft_fast.hf.column_scores on a tiny random Llama (GQA) against eager attention's
output_attentions summed over the chosen rows; prefill-only recording under generate()."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import abft_fast.hf as ah

V, B, L = 61, 3, 11
PAD = (0, 3, 6)
common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(autouse=True)
def torch_backend():
    old = ah.get_backend()
    ah.set_backend("torch")
    yield
    ah.set_backend(old)


def models(cfg=None, seed=0):
    torch.manual_seed(seed)
    cfg = cfg or LlamaConfig(**common)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="abft_fast")
    m.load_state_dict(ref.state_dict())
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


def expected(ref, ids, am, rows):
    """[layers, B, H, L] from eager attentions: rows summed (duplicates twice, -1 skipped), padded
    query rows counting 0 (abft_fast gives them no attention, as HF's flash-attention path; eager
    gives left-padded rows a uniform row and right-padded rows real attention)."""
    with torch.no_grad():
        att = torch.stack(ref(input_ids=ids, attention_mask=am, output_attentions=True).attentions)
    n, lq = att.shape[3], am.shape[1]
    assert n == lq
    sees = am.to(att.dtype)  # the real query rows
    if rows is None:
        return (att * sees[None, :, None, :, None]).sum(3)
    w = torch.zeros(B, lq, dtype=att.dtype)  # how often each row is listed
    for b in range(B):
        for r in rows[b].tolist():
            if r >= 0:
                w[b, r] += 1
    return (att * (w * sees)[None, :, None, :, None]).sum(3)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", ["rows", "last", "all"])
def test_scores_match_eager_attentions(padding, kind):
    ref, m = models()
    ids, am = batch(padding)
    rows = last = None
    if kind == "rows":
        real_last = am.shape[1] - 1 if padding == "left" else None
        rows = []
        for b in range(B):
            lr = real_last if real_last is not None else int(am[b].nonzero().max())
            rows.append([lr, lr, lr - 1, -1])  # duplicate counts twice, -1 unused
        rows = torch.tensor(rows)
    elif kind == "last":
        last = 3
        rows = torch.arange(L - 3, L).expand(B, -1)  # what last=3 means
    with ah.column_scores(m, rows=None if kind == "last" else rows, last=last) as rec:
        m(input_ids=ids, attention_mask=am)  # grad mode on: the recorder detaches
    want = expected(ref, ids, am, rows)
    assert rec.layers == [0, 1]
    assert rec.scores.shape == (2, B, 4, L) and rec.scores.dtype == torch.float32
    assert not rec.scores.requires_grad
    assert float(want.abs().sum()) > 0
    torch.testing.assert_close(rec.scores, want, rtol=1e-4, atol=1e-6)
    # padded keys get nothing
    assert torch.all(rec.scores[:, ~am.bool()[:, None, :].expand(-1, 4, -1)] == 0)


def test_generate_records_prefill_only():
    ref, m = models()
    ids, am = batch("left")
    with ah.column_scores(m, last=4) as rec:
        out = m.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (B, L + 3)
    assert rec.layers == [0, 1] and rec.scores.shape == (2, B, 4, L)
    torch.testing.assert_close(rec.scores, expected(ref, ids, am, torch.arange(L - 4, L).expand(
        B, -1)), rtol=1e-4, atol=1e-6)
    # two contexts on one model (SnapKV window and H2O's all rows) fill in one generate()
    with ah.column_scores(m) as rec_all, ah.column_scores(m, last=4) as rec_w:
        m.generate(ids, attention_mask=am, max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(rec_w.scores, rec.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rec_all.scores, expected(ref, ids, am, None), rtol=1e-4,
                               atol=1e-6)


def test_sliding_window_model_and_probe_together():
    cfg = MistralConfig(**common, sliding_window=4)
    ref, m = models(cfg)
    ids, am = batch("right")
    rows = torch.tensor([[10, 3], [7, 7], [4, -1]])
    with ah.column_scores(m, rows=rows) as rec, ah.probe(m, rows=rows) as prec:
        m(input_ids=ids, attention_mask=am)
    want = expected(ref, ids, am, rows)
    torch.testing.assert_close(rec.scores, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rec.scores, prec.probs.detach().sum(3), rtol=1e-5, atol=1e-6)


def test_triton_backend_matches_eager():
    from abft_fast.ops.attention import triton_available
    ok, why = triton_available(torch.empty(0).device)
    if not ok:
        pytest.skip(why)
    ah.set_backend("triton")
    cfg = LlamaConfig(**dict(common, num_hidden_layers=1))
    ref, m = models(cfg)
    ids, am = batch("left", length=8)
    for rows in (None, torch.tensor([[7, 6], [7, 7], [5, -1]])):  # sample 2: row 5 sees no key
        with ah.column_scores(m, rows=rows) as rec:
            m(input_ids=ids, attention_mask=am)
        torch.testing.assert_close(rec.scores, expected(ref, ids, am, rows)[:1], rtol=1e-4,
                                   atol=1e-6)


def test_argument_errors():
    ref, m = models()
    ids, am = batch("left")
    with pytest.raises(ValueError, match="attn_implementation='abft_fast'"):
        with ah.column_scores(ref):
            pass
    with pytest.raises(ValueError, match="rows or last, not both"):
        with ah.column_scores(m, rows=torch.zeros(B, 1, dtype=torch.long), last=2):
            pass
    with pytest.raises(ValueError, match="last must be a positive int"):
        with ah.column_scores(m, last=0):
            pass
    with pytest.raises(TypeError, match="rows must be an integer tensor"):
        with ah.column_scores(m, rows=torch.zeros(B, 1)):
            pass
    with pytest.raises(ValueError, match="rows have batch size 2"):
        with ah.column_scores(m, rows=torch.zeros(2, 1, dtype=torch.long)):
            m(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match=rf"rows values must lie in \[-1, {L}\)"):
        with ah.column_scores(m, rows=torch.full((B, 1), L)):
            m(input_ids=ids, attention_mask=am)
    with pytest.raises(RuntimeError, match="no attention layer recorded"):
        with ah.column_scores(m) as rec:
            pass
        rec.scores  # noqa: B018
    with ah.column_scores(m, last=2) as rec:  # records again after the errors
        m(input_ids=ids, attention_mask=am)
    assert rec.scores.shape == (2, B, 4, L)
