"""QLoRA on the CPU: a tiny random Llama with its linear layers in 4-bit NF4 (bitsandbytes) and
LoRA on q/k. The probes equal eager attention on the same quantised model; the gradients equal a
float32 model holding the de-quantised weights; only the LoRA factors move; runs are
deterministic, resume, save and reload; bad setups are named."""
import json
import types
import warnings

import pytest
import torch
from cases import expected_probes
from tokenizers_offline import save_tiny_llama
from transformers import AutoModelForCausalLM

import abft_fast.hf as ah
from abft_fast.abft import cli, data, trainer
from abft_fast.hf import packaged, quant

bnb_functional = pytest.importorskip("bitsandbytes.functional",
                                     reason="make install installs bitsandbytes (abft-fast[qlora])")


@pytest.fixture(scope="module")
def task():
    return data.load_task("sst2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, task):
    d = tmp_path_factory.mktemp("tiny-llama-4bit")
    save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool])
    return str(d)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, task):
    """Width 64: bitsandbytes' CPU repacking needs rows of at least one 64-value block."""
    d = tmp_path_factory.mktemp("tiny-llama-4bit-64")
    save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool], hidden=64)
    return str(d)


def load4(model_dir, attn="abft_fast"):
    model, tok = packaged.load(model_dir, load_in_4bit=True, attn_implementation=attn)
    return model, tok


def linear4bit(model):
    return [m for m in model.modules()
            if any(type(p).__name__ == "Params4bit" for p in m.parameters(recurse=False))]


def with_lora(model, seed=0, like=None):
    """LoRA r 4 on q/k with non-zero B (so the adapters change the attention); ``like``: copy
    another LoRA model's factors instead of drawing them."""
    torch.manual_seed(seed)
    m = trainer.add_lora(model, r=4)
    g = torch.Generator().manual_seed(seed + 1)
    src = dict(like.named_parameters()) if like is not None else None
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" not in n:
                continue
            p.copy_(src[n] if src is not None else
                    torch.randn(p.shape, generator=g) * (0.5 if "lora_B" in n else 0.2))
    return m


def batch(model_dir, task, n=4):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = data.encode(tok, data.training_prompts(task, n, 4, seed=3))
    return data.collate(enc, tok.pad_token_id)


def assert_rel_close(got, want, name, rel=1e-4):
    """Close in norm: |got - want| <= rel |want| (float32 sums in another order differ by ~1e-7
    of the largest entry, not of each one)."""
    err = float((got - want).norm() / want.norm())
    assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_probes_and_gradients_match_eager_on_the_same_4bit_model(model_dir, task):
    m, _ = load4(model_dir)
    ref, _ = load4(model_dir, attn="eager")
    assert quant.is_4bit(m) and len(linear4bit(m)) == 2 * 7  # q k v o gate up down, 2 layers
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    m = with_lora(m)
    ref = with_lora(ref, like=m)
    b = batch(model_dir, task)
    with ah.probe(m, rows=b.rows, cols=b.cols) as rec:
        m(input_ids=b.input_ids, attention_mask=b.attention_mask)
    out = ref(input_ids=b.input_ids, attention_mask=b.attention_mask, output_attentions=True)
    want = expected_probes(out.attentions, b.rows, b.cols)
    torch.testing.assert_close(rec.probs, want, rtol=1e-4, atol=1e-6)
    assert float(want.detach().abs().sum()) > 0
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    (rec.probs * w).sum().backward()
    (want * w).sum().backward()
    got, exp = lora_grads(m), lora_grads(ref)
    assert set(got) == set(exp) and len(got) == 2 * 2 * 2  # layers x (q, k) x (A, B)
    for n in exp:
        assert float(exp[n].abs().sum()) > 0, n
        assert_rel_close(got[n], exp[n], n)


def float_twin(model_dir, q):
    """A float32 model whose linear weights are the de-quantised NF4 weights of ``q``."""
    f = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="abft_fast",
                                             dtype=torch.float32)
    qm = dict(q.named_modules())
    with torch.no_grad():
        for name, mod in f.named_modules():
            if name in qm and any(
                    type(p).__name__ == "Params4bit" for p in qm[name].parameters(recurse=False)):
                w = qm[name].weight
                mod.weight.copy_(bnb_functional.dequantize_4bit(w.data, w.quant_state)
                                 .reshape(mod.weight.shape).float())
    return f


def test_gradients_equal_a_float_model_with_the_dequantised_weights(wide_dir, task):
    # Loaded by transformers directly (not abft_fast's loader), then evaluated without grad: on a
    # CPU with AVX512-BF16, bitsandbytes repacks the weights here for a kernel without backward
    # (and rounds their scales to bfloat16). keep_differentiable, which the trainer calls, must
    # undo the repacking; the float twin is made from the weights as they are after it.
    q = AutoModelForCausalLM.from_pretrained(wide_dir, attn_implementation="abft_fast",
                                             quantization_config=quant.nf4_config())
    b = batch(wide_dir, task)
    with torch.no_grad():
        q.eval()(input_ids=b.input_ids, attention_mask=b.attention_mask)
    repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                   for m in linear4bit(q))
    print(f"layers repacked for the CPU inference kernel by the evaluation: {repacked} of 14")
    assert quant.keep_differentiable(q) == 14
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in linear4bit(q)), f"{repacked} layers were repacked and not undone"
    f = float_twin(wide_dir, q)
    q = with_lora(q)
    f = with_lora(f, like=q)
    probs = []
    for model in (q, f):
        p = trainer.ProbeForward(model)(b.input_ids, b.attention_mask, b.rows, b.cols)
        w = torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
        (p * w).sum().backward()
        probs.append(p.detach())
    torch.testing.assert_close(probs[0], probs[1], rtol=1e-5, atol=1e-6)
    got, exp = lora_grads(q), lora_grads(f)
    assert len(exp) == 8
    for n in exp:  # layer 0's factors get their gradient through layer 1's 4-bit layers
        assert float(exp[n].abs().sum()) > 0, n
        assert_rel_close(got[n], exp[n], n)


def cfg(**kw):
    base = dict(train_prompts=8, steps=2, batch=4, micro_batch=2, lr=1e-3, use_filter=False,
                use_pid=False, seed=0, lora=True, lora_r=4)
    base.update(kw)
    return trainer.TrainConfig(**base)


def frozen_state(model):
    """Everything but the LoRA factors, the 4-bit weights and their quantisation state included."""
    return {k.replace(".base_layer", ""): v.detach().clone()  # peft's wrapper renames
            for k, v in trainer.unwrap(model).state_dict().items() if "lora_" not in k}


def test_training_moves_only_the_lora_factors_of_every_layer_deterministically(model_dir, task):
    runs = []
    for _ in range(2):
        m, tok = load4(model_dir)
        before = frozen_state(m)
        res = trainer.train(m, tok, task, cfg(), progress=False)
        after = frozen_state(res.model)
        assert set(after) == set(before) and any(v.dtype == torch.uint8 for v in after.values())
        assert all(torch.equal(before[k], after[k]) for k in before)
        moved = {n: p.detach().clone() for n, p in res.model.named_parameters() if p.requires_grad}
        assert sorted({n.split(".self_attn.")[1].split(".")[0] for n in moved}) == ["k_proj", "q_proj"]
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in moved} == {0, 1}
        for n, p in moved.items():
            if "lora_B" in n:  # zero at init: every factor left it
                assert float(p.abs().sum()) > 0, n
        runs.append((moved, [h["loss"] for h in res.history]))
    (a, la), (b, lb) = runs
    assert la == lb and all(torch.equal(a[n], b[n]) for n in a)


def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_run(model_dir, task):
    runs = []
    for ck in (False, True):
        m, tok = load4(model_dir)
        res = trainer.train(m, tok, task, cfg(gradient_checkpointing=ck), progress=False)
        runs.append(({n: p.detach() for n, p in res.model.named_parameters() if p.requires_grad},
                     [h["loss"] for h in res.history]))
    (a, la), (b, lb) = runs
    assert la == pytest.approx(lb, rel=1e-5)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)


def test_save_reload_and_resume_on_a_4bit_base(model_dir, task, tmp_path):
    from test_resume import Killed, kill_after
    m, tok = load4(model_dir)
    full = trainer.train(m, tok, task, cfg(steps=3), progress=False)
    path = tmp_path / "qk.safetensors"
    trainer.save_qk(full.model, path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert meta["lora"] == "1" and meta["base"] == "nf4" and all("lora_" in k for k in keys)
    # reloaded onto a fresh 4-bit base: the same probes
    b = batch(model_dir, task)
    fresh = trainer.load_qk(load4(model_dir)[0], path)
    with torch.no_grad():
        p0 = trainer.ProbeForward(full.model)(b.input_ids, b.attention_mask, b.rows, b.cols)
        p1 = trainer.ProbeForward(fresh)(b.input_ids, b.attention_mask, b.rows, b.cols)
    assert torch.equal(p0, p1)
    # onto a full-precision base: loads, with a warning that the base differs
    plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="abft_fast")
    with pytest.warns(UserWarning, match="trained on a nf4 base and is loaded onto a full one"):
        trainer.load_qk(plain, path)
    # killed after step 1 and resumed: the uninterrupted run, bit for bit
    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        m, tok = load4(model_dir)
        trainer.train(m, tok, task, cfg(steps=3), progress=False, save_every=1,
                      checkpoint_dir=ck, on_step=kill_after(1))
    m, tok = load4(model_dir)
    res = trainer.train(m, tok, task, cfg(steps=3), progress=False, resume=ck)
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    r = {n: p for n, p in res.model.named_parameters() if p.requires_grad}
    assert set(a) == set(r) and all(torch.equal(a[n], r[n]) for n in a)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history]


def test_full_qk_weights_cannot_go_into_a_4bit_base(model_dir, task, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="abft_fast")
    path = tmp_path / "full.safetensors"
    trainer.freeze_all_but_qk(plain)
    trainer.save_qk(plain, path)
    with pytest.raises(ValueError, match="full W_Q/W_K, which cannot be loaded into a 4-bit base"):
        trainer.load_qk(load4(model_dir)[0], path)


def test_a_4bit_model_needs_lora_and_no_fsdp(model_dir, task):
    m, tok = load4(model_dir)
    with pytest.raises(ValueError, match="4-bit .* cannot train; use lora=True"):
        trainer.train(m, tok, task, cfg(lora=False), progress=False)
    with pytest.raises(ValueError, match="fsdp=True with a 4-bit model"):
        trainer.train(m, tok, task, cfg(fsdp=True), progress=False)


def test_missing_bitsandbytes_names_the_package_and_the_extra(monkeypatch, model_dir):
    real = quant.importlib.util.find_spec
    monkeypatch.setattr(quant.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*abft-fast\[qlora\]"):
        packaged.load(model_dir, load_in_4bit=True)


def test_a_gpu_without_bitsandbytes_cuda_support_is_named(monkeypatch):
    from bitsandbytes import cextension
    monkeypatch.setattr(cextension, "lib", types.SimpleNamespace())  # no CUDA library loaded
    with pytest.raises(RuntimeError, match="loaded no CUDA library"):
        quant.check_bitsandbytes("cuda")
    quant.check_bitsandbytes("cpu")  # the CPU needs no CUDA library


def test_nf4_config_is_the_qlora_recipe():
    c = quant.nf4_config(device="cpu")
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.float32
    assert quant.nf4_config(device="cuda").bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.device_map("cpu") is None
    assert quant.device_map("cuda:1") == {"": torch.device("cuda", 1)}


def test_cli_defaults_for_4bit():
    a = cli.parse_args(["train", "--load-in-4bit"])
    assert a.lora and a.lr == cli.QLORA_LR == 1e-4 and a.lora_r == 16
    assert cli.parse_args(["train", "--load-in-4bit", "--lr", "3e-4"]).lr == 3e-4
    b = cli.parse_args(["train"])
    assert not b.lora and b.lr == cli.LR == 2e-5
    with pytest.raises(SystemExit, match="--load-in-4bit with --fsdp"):
        cli.parse_args(["train", "--load-in-4bit", "--fsdp"])
    with pytest.raises(SystemExit, match="--load-in-4bit needs LoRA"):
        cli.parse_args(["train", "--load-in-4bit", "--no-lora"])
    assert cli.parse_args(["train", "--lora"]).lora and not cli.parse_args(["demo", "--no-lora"]).lora


def test_cli_train_and_eval_in_4bit(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--model", model_dir, "--load-in-4bit", "--lora-r", "4",
              "--train-prompts", "8", "--steps", "2", "--batch", "4", "--micro-batch", "2",
              "--eval-queries", "6", "--no-filter", "--out", str(out), "--no-progress",
              "--no-plots"])
    printed = capsys.readouterr().out
    assert "4-bit NF4 base + LoRA r 4 on q/k" in printed and "lr 0.0001" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["lora"] is True and rep["settings"]["load_in_4bit"] is True
    assert rep["settings"]["lr"] == 1e-4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["eval", "--model", model_dir, "--load-in-4bit", "--eval-queries", "6",
                  "--weights", str(out / "qk.safetensors"), "--out", str(tmp_path / "ev"),
                  "--no-progress"])
    assert not [w for w in caught if "base and is loaded" in str(w.message)]  # the same base
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["accuracy"] == rep["accuracy_after"]
    assert ev["prediction_counts"] == rep["eval_after"]["prediction_counts"]
