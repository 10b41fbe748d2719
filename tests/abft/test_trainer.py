"""ABFT training on tiny random models: the loss goes down, only W_Q / W_K move (bitwise),
GPT-2's fused c_attn moves only in its Q and K thirds, weights save and reload."""
import pytest
import torch
from tokenizers_offline import gpt2_style
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import abft_fast.hf  # noqa: F401  (registers attn_implementation "abft_fast")
from abft_fast.abft import data, trainer
from abft_fast.abft.loss import abft_loss


@pytest.fixture(scope="module")
def task():
    return data.load_task("sst2")


@pytest.fixture(scope="module")
def tok(task):
    return gpt2_style([" ".join(e.inputs) for e in task.pool], vocab=400)


def llama(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="abft_fast")


def gpt2(tok, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="abft_fast")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def batch_loss(model, tok, task, n=8, a=0.5, use_filter=False):
    enc = data.encode(tok, data.training_prompts(task, n, 4, seed=0))
    b = data.collate(enc, tok.pad_token_id)
    with torch.no_grad():
        probs = trainer.ProbeForward(model)(b.input_ids, b.attention_mask, b.rows, b.cols)
    return abft_loss(probs, b.correct, b.cols >= 0, b.lengths, A=a, use_filter=use_filter).loss.item()


def cfg(**kw):
    base = dict(train_prompts=8, steps=1, batch=8, micro_batch=4, lr=5e-3, use_filter=False,
                use_pid=False, seed=0)
    base.update(kw)
    return trainer.TrainConfig(**base)


def test_llama_step_lowers_loss_and_moves_only_qk(task, tok):
    model = llama(tok)
    before = snapshot(model)
    loss0 = batch_loss(model, tok, task)
    res = trainer.train(model, tok, task, cfg(), progress=False)
    assert len(res.history) == 1 and res.history[0]["loss"] == pytest.approx(loss0, rel=1e-5)
    assert batch_loss(model, tok, task) < loss0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qk"}
    for n, p in model.named_parameters():
        if n not in moved:
            assert torch.equal(p, before[n]), n


def test_a_trainable_weight_without_gradient_is_an_error_naming_it(task, tok):
    # layer 1's q_proj weight is detached from the graph: the optimiser would skip it silently
    model = llama(tok)
    q = model.model.layers[1].self_attn.q_proj
    q.forward = lambda x: torch.nn.functional.linear(x, q.weight.detach(), q.bias)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"step 1: 1 of 4 trainable parameters received no "
                                           r"gradient \(model\.layers\.1\.self_attn\.q_proj\.weight\)"):
        trainer.train(model, tok, task, cfg(), progress=False)
    for n, p in model.named_parameters():  # raised before the optimiser stepped
        assert torch.equal(p, before[n]), n


def test_check_gradients_lists_what_is_missing():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.zeros(2)
    trainer.check_gradients([("a", a)], 3)
    with pytest.raises(RuntimeError, match=r"step 3: 1 of 2 .*\(b\)"):
        trainer.check_gradients([("a", a), ("b", b)], 3)


def test_gpt2_fused_c_attn_moves_only_q_and_k_thirds(task, tok):
    model = gpt2(tok)
    before = snapshot(model)
    trainer.train(model, tok, task, cfg(steps=2), progress=False)
    e = model.config.n_embd
    for n, p in model.named_parameters():
        if n.endswith("c_attn.weight"):   # Conv1D: [in, 3E], output columns [Q | K | V]
            assert torch.equal(p[:, 2 * e:], before[n][:, 2 * e:]), n  # V bitwise unchanged
            assert not torch.equal(p[:, :e], before[n][:, :e])        # Q moved
            assert not torch.equal(p[:, e:2 * e], before[n][:, e:2 * e])  # K moved
        elif n.endswith("c_attn.bias"):
            assert torch.equal(p[2 * e:], before[n][2 * e:]), n
            assert not torch.equal(p[:2 * e], before[n][:2 * e])
        else:
            assert torch.equal(p, before[n]), n


def test_save_and_reload_round_trip(task, tok, tmp_path):
    for make in (llama, gpt2):
        model = make(tok)
        trainer.train(model, tok, task, cfg(), progress=False)
        path = tmp_path / f"{make.__name__}.safetensors"
        trainer.save_qk(model, path)
        fresh = make(tok, seed=1)  # different init: everything must come from the file for q/k
        ref = snapshot(fresh)
        fresh = trainer.load_qk(fresh, path)
        for q in trainer.qk_parameters(model):
            got = dict(fresh.named_parameters())[q.name]
            if q.keep is None:
                assert torch.equal(got, q.param)
            else:  # fused: trained Q/K part from the file, V part left as the fresh model had it
                dim, stop = q.keep
                assert torch.equal(got.narrow(dim, 0, stop), q.param.narrow(dim, 0, stop))
                rest = got.shape[dim] - stop
                assert torch.equal(got.narrow(dim, stop, rest), ref[q.name].narrow(dim, stop, rest))
        with pytest.raises(ValueError, match="do not match"):
            trainer.load_qk((gpt2 if make is llama else llama)(tok), path)


def test_lora_trains_only_adapters_and_reloads(task, tok, tmp_path):
    model = llama(tok)
    before = snapshot(model)
    res = trainer.train(model, tok, task, cfg(lora=True, lora_r=4, steps=2, lr=1e-2), progress=False)
    peft_model = res.model
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n and ("q_proj" in n or "k_proj" in n) for n in names)
    base = peft_model.get_base_model()
    for n, p in base.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    path = tmp_path / "lora.safetensors"
    trainer.save_qk(peft_model, path)
    again = trainer.load_qk(llama(tok), path)
    ids = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_lora_on_gpt2_c_attn_leaves_v_untouched(task, tok):
    model = gpt2(tok)
    res = trainer.train(model, tok, task, cfg(lora=True, lora_r=4, steps=2, lr=1e-2), progress=False)
    e = model.config.n_embd
    bs = [p for n, p in res.model.named_parameters() if "c_attn.lora_B" in n]
    assert len(bs) == 2
    for p in bs:  # lora_B: [3E, r]; the V rows stay at their zero init, so V's delta is 0
        assert p.shape[0] == 3 * e
        assert torch.count_nonzero(p[2 * e:]) == 0 and torch.count_nonzero(p[:2 * e]) > 0


def test_stop_early_gives_the_same_probes(task, tok):
    model = llama(tok)
    b = data.collate(data.encode(tok, data.training_prompts(task, 3, 4, seed=1)), tok.pad_token_id)
    with torch.no_grad():
        early = trainer.ProbeForward(model, stop_early=True)(b.input_ids, b.attention_mask, b.rows, b.cols)
        full = trainer.ProbeForward(model, stop_early=False)(b.input_ids, b.attention_mask, b.rows, b.cols)
    assert early.shape == full.shape == (2, 3, 4, 1, 4)
    assert torch.equal(early, full)


def test_gradient_accumulation_matches_one_big_batch(task, tok):
    m1, m2 = llama(tok), llama(tok)
    trainer.train(m1, tok, task, cfg(micro_batch=8), progress=False)
    trainer.train(m2, tok, task, cfg(micro_batch=2), progress=False)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6, msg=n)


def test_pid_and_filter_are_wired(task, tok):
    model = llama(tok)
    res = trainer.train(model, tok, task, cfg(steps=4, batch=4, micro_batch=4, use_pid=True,
                                        use_filter=True), progress=False)
    # A random tiny model's heads spread attention thinly: none pass k / (k + ln n_t).
    assert [h["passing_heads"] for h in res.history] == [0.0] * 4
    assert [h["loss"] for h in res.history] == [0.0] * 4
    assert [h["A"] for h in res.history] == [0.5] * 4


def test_pid_follows_the_recorded_head_counts_when_heads_pass(task, tok, monkeypatch):
    # The real probes, their values replaced (gradient kept: p + (c - p.detach())) by label
    # attention that makes a random half of the heads pass the filter (sum 0.8 > k / (k + ln n))
    # and the rest fail (0.2): the loss is non-zero and the PID's input moves from step to step.
    gen = torch.Generator().manual_seed(0)
    real = trainer.ProbeForward.forward

    def forward(self, input_ids, attention_mask, rows, cols):
        p = real(self, input_ids, attention_mask, rows, cols)
        passing = torch.rand(p.shape[:3] + (1, 1), generator=gen) < 0.5
        c = torch.where(passing, 0.2, 0.05).expand_as(p) * (cols >= 0)[None, :, None, None, :]
        return p + (c - p.detach())
    monkeypatch.setattr(trainer.ProbeForward, "forward", forward)
    conf = cfg(steps=6, batch=4, micro_batch=2, use_pid=True, use_filter=True)
    res = trainer.train(llama(tok), tok, task, conf, progress=False)
    n = [h["passing_heads"] for h in res.history]
    assert all(x > 0 for x in n) and len(set(n)) > 2, n
    assert all(h["loss"] > 0 for h in res.history)
    # A_t from the paper's formula (shared/DESIGN.md section 1), independently of abft/pid.py:
    # the A each step used is a0, then the update after each step's head count, from t = 3 on.
    want, a = [], conf.a0
    for t in range(1, len(n) + 1):
        want.append(a)
        if t > 2:
            a += (conf.cp * (n[t - 1] - n[t - 2]) + conf.ci * (n[t - 1] - n[0])
                  + conf.cd * (n[t - 1] - 2 * n[t - 2] + n[t - 3]))
    assert [h["A"] for h in res.history] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert want[-1] != conf.a0


@pytest.mark.parametrize("bad, msg", [
    (dict(batch=6, micro_batch=4), "multiple of micro_batch"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive finite"),
    (dict(a0=float("nan")), "a0 must be a finite number"),
])
def test_bad_config_is_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        trainer.TrainConfig(**bad).check()


def test_model_without_qk_is_rejected():
    with pytest.raises(ValueError, match="found no W_Q/W_K"):
        trainer.qk_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)))
