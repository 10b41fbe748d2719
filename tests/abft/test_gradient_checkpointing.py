"""Gradient checkpointing (HF, non-reentrant) with the probe recorder: probes recorded once by the
forward, replayed (not recorded again) by the recomputation in backward, and the same probes and
gradients as without checkpointing; ABFT training with --gradient-checkpointing equals the run
without it."""
import pytest
import torch
from tokenizers_offline import gpt2_style
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import abft_fast.hf as ah
from abft_fast.abft import data, trainer
from abft_fast.abft.objective import ProbeForward
from abft_fast.abft.trainer import enable_gradient_checkpointing


def llama(seed=0, vocab=100):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="abft_fast")


def gpt2(seed=0, vocab=100):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="abft_fast")


IDS = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
AM = torch.ones_like(IDS)
AM[1, 15:] = 0
ROWS = torch.tensor([[19], [14]])
COLS = torch.tensor([[3, 7, 11], [2, 5, -1]])


def probe_and_grads(model, stop_early):
    """Probes and gradients of a weighted probe sum; the recorder when not stopping early."""
    model.zero_grad(set_to_none=True)
    rec = None
    if stop_early:  # the trainer's forward: StopForward after the last layer's attention
        probs = ProbeForward(model, True)(IDS, AM, ROWS, COLS)
    else:
        with ah.probe(model, ROWS, COLS) as rec:
            model(input_ids=IDS, attention_mask=AM, use_cache=False)
        probs = rec.probs
    loss = (probs * torch.linspace(0.5, 2.0, probs.numel()).view_as(probs)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return probs.detach(), grads, rec


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("stop_early", [False, True], ids=["full", "stop-early"])
def test_same_probes_and_gradients_as_without_checkpointing(make, stop_early):
    ah.set_backend("torch")
    ref = make()
    ref.eval()
    p0, g0, _ = probe_and_grads(ref, stop_early)
    m = make()
    enable_gradient_checkpointing(m)
    m.train()  # HF checkpoints layers in training mode only (no dropout in these configs)
    p1, g1, rec = probe_and_grads(m, stop_early)
    if rec is not None:
        assert rec.layers == [0, 1, 2]         # recorded once per layer by the forward ...
        assert rec.recomputed == 3             # ... and replayed once per layer in backward
    assert torch.equal(p0, p1)
    assert set(g0) == set(g1) and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)


def test_backward_inside_the_probe_context_and_reentrant_refused():
    ah.set_backend("torch")
    m = llama()
    enable_gradient_checkpointing(m)
    m.train()
    with ah.probe(m, ROWS, COLS) as rec:
        m(input_ids=IDS, attention_mask=AM, use_cache=False)
        rec.probs.sum().backward()  # recomputation while the context is open: not "ran twice"
    assert rec.layers == [0, 1, 2] and rec.recomputed == 3
    # a genuine second forward in one context is still refused
    with pytest.raises(RuntimeError, match="ran twice"):
        with ah.probe(m, ROWS, COLS):
            m(input_ids=IDS, attention_mask=AM, use_cache=False)
            m(input_ids=IDS, attention_mask=AM, use_cache=False)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(NotImplementedError, match="reentrant"):
        with ah.probe(m, ROWS, COLS):
            m(input_ids=IDS, attention_mask=AM, use_cache=False)
    # the checkpoint functions are restored after the context
    m.gradient_checkpointing_disable()
    with ah.probe(m, ROWS, COLS) as rec:
        m(input_ids=IDS, attention_mask=AM, use_cache=False)
    assert rec.probs.shape[0] == 3


def test_training_with_checkpointing_equals_without():
    ah.set_backend("torch")
    task = data.load_task("sst2")
    tok = gpt2_style([" ".join(e.inputs) for e in task.pool], vocab=400)
    cfg = dict(train_prompts=4, steps=2, batch=4, micro_batch=2, lr=5e-3, use_filter=False,
               seed=0)
    out = []
    for gc in (False, True):
        r = trainer.train(llama(vocab=len(tok)), tok, task,
                          trainer.TrainConfig(gradient_checkpointing=gc, **cfg), progress=False)
        out.append((r, {n: p.detach().clone() for n, p in r.model.named_parameters()
                        if p.requires_grad}))
        if gc:
            assert r.model.model.layers[0].gradient_checkpointing
    (r0, w0), (r1, w1) = out
    assert [h["loss"] for h in r1.history] == pytest.approx([h["loss"] for h in r0.history],
                                                            rel=1e-6)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=1e-6, atol=1e-7, msg=n)
