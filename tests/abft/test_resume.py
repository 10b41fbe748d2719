"""Resumable ABFT runs: a run stopped after step 2 of 4 and resumed from its checkpoint ends with
bitwise the same weights, optimiser state and history as an uninterrupted run; corrupt or
mismatching checkpoints are refused before anything is loaded."""
import json
import os

import pytest
import torch
from tokenizers_offline import gpt2_style
from transformers import LlamaConfig, LlamaForCausalLM

import abft_fast.hf  # noqa: F401  (registers attn_implementation "abft_fast")
from abft_fast.abft import data, trainer
from abft_fast.abft.checkpoint import CheckpointError, find_checkpoint


@pytest.fixture(scope="module")
def task():
    return data.load_task("sst2")


@pytest.fixture(scope="module")
def tok(task):
    return gpt2_style([" ".join(e.inputs) for e in task.pool], vocab=400)


def llama(tok, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="abft_fast")


def cfg(**kw):
    # train_prompts 6 with batch 4: the data order reshuffles inside the run (and across the
    # resume point), the PID acts from step 3 on.
    base = dict(train_prompts=6, steps=4, batch=4, micro_batch=2, lr=5e-3, use_filter=False,
                use_pid=True, seed=0)
    base.update(kw)
    return trainer.TrainConfig(**base)


class Killed(Exception):
    pass


def kill_after(n):
    def hook(step, rec):
        if step == n:
            raise Killed
    return hook


def qk(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_killed_and_resumed_run_equals_uninterrupted(task, tok, tmp_path):
    abft_fast.hf.set_backend("torch")
    full = trainer.train(llama(tok), tok, task, cfg(), progress=False)
    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        trainer.train(llama(tok), tok, task, cfg(), progress=False, save_every=2,
                      checkpoint_dir=ck, on_step=kill_after(3))
    # step 2 was saved, step 3 ran and was lost with the "kill"; nothing half-written is left
    assert sorted(os.listdir(ck)) == ["step-000002"]
    assert sorted(os.listdir(ck / "step-000002")) == ["meta.json", "state.pt"]
    assert find_checkpoint(ck) == str(ck / "step-000002")
    st = torch.load(ck / "step-000002" / "state.pt", weights_only=True)
    assert st["step"] == 2 and len(st["pid"]["history"]) == 2 and len(st["history"]) == 2
    assert len(st["data_order"]["order"]) == 6 - 8 % 6  # 8 drawn: 6, then 2 of a new permutation
    assert set(st["trainable"]) == set(qk(full.model)) and st["optimizer"]["state"]
    steps = []
    res = trainer.train(llama(tok), tok, task, cfg(), progress=False, resume=ck,
                        on_step=lambda s, r: steps.append(s))
    assert steps == [3, 4]
    a, b = qk(full.model), qk(res.model)
    assert set(a) == set(b) and len(a) == 4
    for n in a:
        assert torch.equal(a[n], b[n]), n
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in res.history] == strip
    with pytest.raises(CheckpointError, match="step 2 > steps 1"):
        trainer.train(llama(tok), tok, task, cfg(steps=1), progress=False, resume=ck)


def test_lora_resume_restores_factors(task, tok, tmp_path):
    abft_fast.hf.set_backend("torch")
    c = dict(steps=2, batch=2, micro_batch=2, lora=True, lora_r=2)
    full = trainer.train(llama(tok), tok, task, cfg(**c), progress=False)
    with pytest.raises(Killed):
        trainer.train(llama(tok), tok, task, cfg(**c), progress=False, save_every=1,
                      checkpoint_dir=tmp_path, on_step=kill_after(1))
    res = trainer.train(llama(tok), tok, task, cfg(**c), progress=False, resume=tmp_path)
    a, b = qk(full.model), qk(res.model)
    assert a and all("lora_" in n for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def saved(task, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    abft_fast.hf.set_backend("torch")
    trainer.train(llama(tok), tok, task, cfg(steps=1), progress=False, save_every=1,
                  checkpoint_dir=d)
    return d / "step-000001"


def refused(tok, task, path, match, model=None, **kw):
    model = model or llama(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=match):
        trainer.train(model, tok, task, cfg(steps=2, **kw), progress=False, resume=path)
    # never half-loaded: the model is untouched
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_mismatching_checkpoints_are_refused(task, tok, saved):
    refused(tok, task, saved, r"config lr: checkpoint 0.005, this run 0.001", lr=1e-3)
    refused(tok, task, saved, r"config k: checkpoint 4, this run 3", k=3)
    refused(tok, task, saved, "initial weights differ", model=llama(tok, seed=1))
    refused(tok, task, saved, "model config differs|trainable tensors differ",
            model=llama(tok, layers=3))
    other = data.load_task("mr")
    model = llama(tok)
    with pytest.raises(CheckpointError, match="training data differ"):
        trainer.train(model, tok, other, cfg(steps=2), progress=False, resume=saved)


def test_corrupt_checkpoints_are_refused(task, tok, saved, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    with open(bad / "state.pt", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    refused(tok, task, bad, "state.pt is corrupt")
    (bad / "state.pt").unlink()
    refused(tok, task, bad, "state.pt is missing")
    (bad / "meta.json").write_text("{not json")
    refused(tok, task, bad, "unreadable meta.json")
    (bad / "meta.json").write_text(json.dumps({"format": "something-else"}))
    refused(tok, task, bad, "not an abft training checkpoint")
    refused(tok, task, tmp_path / "nowhere", "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "step-000003.tmp-123").mkdir()  # an interrupted save is not a checkpoint
    refused(tok, task, empty, "neither a checkpoint")
