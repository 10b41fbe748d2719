"""Multi-query ABFT (beyond the paper): every demonstration's label prediction row gets the loss
with its own I+ / I- and its own filter threshold. Rows and sets by hand, the loss against a loop
of single-row paper losses on eager attentions, the single-query path unchanged bitwise, and a
CLI run."""
import json
import math

import pytest
import torch
from tokenizers_offline import llama_style, save_tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import abft_fast.hf  # noqa: F401  (registers attn_implementation "abft_fast")
from abft_fast.abft import cli, data, trainer
from abft_fast.abft.loss import abft_loss, multi_query_loss, threshold


@pytest.fixture(scope="module")
def task():
    return data.load_task("sst2")


@pytest.fixture(scope="module")
def tok(task):
    return llama_style([" ".join(e.inputs) for e in task.pool], vocab=400)


def llama(tok, impl="abft_fast", dtype=torch.float32, qk_scale=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=impl).to(dtype)
    with torch.no_grad():  # peaky attention, so that some heads pass the filter
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    return m


# ----------------------------------------------------------------------------- rows and sets


def test_rows_and_label_sets_by_hand():
    # 20 tokens; labels at 4, 9, 14, 17 with labels 0 1 0 0; query label 1.
    # Second prompt: 2 demonstrations (labels at 3 and 7, labels 1 1), 12 tokens, query label 0.
    a = data.Encoded(list(range(20)), [4, 9, 14, 17], [0, 1, 0, 0], 1)
    b = data.Encoded(list(range(12)), [3, 7], [1, 1], 0)
    assert data.prediction_rows(a) == [-1, 8, 13, 16, 19]
    assert data.prediction_rows(b) == [-1, 6, 11]
    mb = data.collate_multi_query([a, b], pad_id=0)
    assert mb.rows.tolist() == [[-1, 8, 13, 16, 19], [-1, 6, -1, -1, 11]]
    assert mb.row_active.tolist() == [[False, True, True, True, True],
                                      [False, True, False, False, True]]
    assert mb.row_lengths.tolist() == [[0, 9, 14, 17, 20], [0, 7, 0, 0, 12]]
    T, F = True, False
    # valid: only labels before the row (demonstration r sees labels 0..r-1; the query all k)
    assert mb.row_valid[0].tolist() == [[F, F, F, F], [T, F, F, F], [T, T, F, F],
                                        [T, T, T, F], [T, T, T, T]]
    assert mb.row_valid[1].tolist() == [[F, F, F, F], [T, F, F, F], [F, F, F, F],
                                        [F, F, F, F], [T, T, F, F]]
    # I+ of row r: earlier labels equal to label r (row 1: label 1 vs [0] -> none;
    # row 2: label 0 vs [0, 1]; row 3: label 0 vs [0, 1, 0]; query: label 1 vs [0, 1, 0, 0])
    assert mb.row_correct[0].tolist() == [[F, F, F, F], [F, F, F, F], [T, F, F, F],
                                          [T, F, T, F], [F, T, F, F]]
    assert mb.row_correct[1].tolist() == [[F, F, F, F], [T, F, F, F], [F, F, F, F],
                                          [F, F, F, F], [F, F, F, F]]
    # the Batch fields keep their single-query meaning
    single = data.collate([a, b], pad_id=0)
    for f in ("input_ids", "attention_mask", "cols", "correct", "lengths", "query_label"):
        assert torch.equal(getattr(mb, f), getattr(single, f)), f
    assert torch.equal(mb.rows[:, -1:], single.rows)
    moved = mb.to("cpu")
    assert isinstance(moved, data.MultiQueryBatch) and torch.equal(moved.row_valid, mb.row_valid)


def test_rows_on_a_real_prompt_predict_each_label(task, tok):
    """On StaICC's SST-2 template, each demonstration row is the ':' of "sentiment:" just before
    the label token, the same token the query row (the prompt's last) is."""
    enc = data.encode(tok, data.training_prompts(task, 3, 4, seed=2))
    for e in enc:
        rows = data.prediction_rows(e)
        assert rows[0] == -1 and rows[-1] == len(e.input_ids) - 1
        for r, p in zip(rows[1:-1], e.label_pos[1:]):
            assert r == p - 1 and e.input_ids[r] == e.input_ids[-1]
            assert tok.decode([e.input_ids[r]]).endswith(":")


def test_per_row_threshold_by_hand():
    """Each row is filtered with its own k_r and n_r: a head with mass 0.3 on the one earlier
    label at row length 20 passes (T = 1 / (1 + ln 20) = 0.25) although it would fail the query's
    threshold (k = 2, n = 40: T = 0.35)."""
    correct = torch.tensor([[[False, False], [True, False], [False, True]]])
    valid = torch.tensor([[[False, False], [True, False], [True, True]]])
    lengths = torch.tensor([[0, 20, 40]])
    active = torch.tensor([[False, True, True]])
    # 1 layer, 1 sample, 2 heads, 3 rows, 2 cols
    p = torch.tensor([[[[[0.0, 0.0], [0.3, 0.0], [0.1, 0.2]],      # head 0
                        [[0.0, 0.0], [0.2, 0.0], [0.3, 0.2]]]]],   # head 1
                     dtype=torch.float64)
    t1, t2 = 1 / (1 + math.log(20)), 2 / (2 + math.log(40))
    assert threshold(1, 20).item() == pytest.approx(t1) and 0.2 < t1 < 0.3 < t2 < 0.5
    A, B = 0.5, 1.0
    out = multi_query_loss(p, correct, valid, lengths, active, A=A, B=B)
    assert out.head_mask[0, 0].tolist() == [[False, True, False], [False, False, True]]
    assert out.row_passing.tolist() == [[0, 1, 1]]
    row1 = B * (1 - 0.3)                # head 0 at row 1: correct 0.3, no wrong label
    row2 = A * 0.3 + B * (1 - 0.2)      # head 1 at the query row: wrong 0.3, correct 0.2
    assert out.loss.item() == pytest.approx((row1 + row2) / 2)
    assert out.passing.tolist() == [1.0]
    assert out.mass_correct[0, 0].tolist() == pytest.approx([0.2, 0.2])  # the query row's
    nf = multi_query_loss(p, correct, valid, lengths, active, A=A, B=B, use_filter=False)
    assert nf.row_passing.tolist() == [[0, 2, 2]]  # inactive row 0 never counts
    with pytest.raises(ValueError, match="correct must have shape"):
        multi_query_loss(p, correct[:, :2], valid, lengths, active)
    with pytest.raises(ValueError, match="active must have shape"):
        multi_query_loss(p, correct, valid, lengths, active[:, :2])


def test_query_row_only_equals_the_paper_loss():
    torch.manual_seed(0)
    p = torch.rand(2, 3, 4, 1, 4, dtype=torch.float64) / 3
    correct = torch.rand(3, 4) > 0.5
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2, 3] = False
    lengths = torch.tensor([12, 30, 7])
    ref = abft_loss(p, correct, valid, lengths, A=0.7)
    out = multi_query_loss(p, correct[:, None], valid[:, None], lengths[:, None],
                           torch.ones(3, 1, dtype=torch.bool), A=0.7)
    assert ref.passing.sum() > 0 and out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    assert out.passing.tolist() == ref.passing.tolist()


# ----------------------------------------------------------------------------- vs eager


def loop_reference(attentions, mb, A, B, use_filter):
    """Mean over samples of the mean over active rows of the paper's single-row loss
    (``abft_loss`` with R = 1, the row's own sets and n_r), from eager attentions."""
    per_sample, passing = [], []
    for b in range(mb.rows.shape[0]):
        losses, heads = [], []
        for r in range(mb.rows.shape[1]):
            if not mb.row_active[b, r]:
                continue
            row = int(mb.rows[b, r])
            cols = mb.cols[b].clamp(min=0)
            p = torch.stack([att[b, :, row, cols] for att in attentions])  # [layers, H, C]
            p = p * (mb.cols[b] >= 0)
            out = abft_loss(p[:, None, :, None, :], mb.row_correct[b, r][None],
                            mb.row_valid[b, r][None], mb.row_lengths[b, r][None],
                            A=A, B=B, use_filter=use_filter)
            losses.append(out.loss)
            heads.append(int(out.passing))
        per_sample.append(torch.stack(losses).mean())
        passing.append(sum(heads) / len(heads))
    return torch.stack(per_sample).mean(), passing


@pytest.mark.parametrize("use_filter", [True, False])
def test_loss_equals_loop_of_single_row_losses_on_eager(task, tok, use_filter):
    model = llama(tok, dtype=torch.float64, qk_scale=20.0)
    ref = llama(tok, "eager", dtype=torch.float64, qk_scale=20.0)
    ref.load_state_dict(model.state_dict())
    enc = data.encode(tok, data.training_prompts(task, 6, 4, seed=0))
    enc[1] = data.Encoded(enc[1].input_ids[:60], enc[1].label_pos[:1], enc[1].demo_labels[:1],
                          enc[1].query_label)  # a short sample: 1 demonstration, query row only
    mb = data.collate_multi_query(enc, tok.pad_token_id)
    A, B = 0.7, 1.0
    probs = trainer.ProbeForward(model)(mb.input_ids, mb.attention_mask, mb.rows, mb.cols)
    out = multi_query_loss(probs, mb.row_correct, mb.row_valid, mb.row_lengths, mb.row_active,
                           A=A, B=B, use_filter=use_filter)
    att = ref(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
              output_attentions=True).attentions
    want, passing = loop_reference(att, mb, A, B, use_filter)
    if use_filter:  # the filter is exercised: some rows pass, most do not
        assert 0 < out.row_passing.sum() < mb.row_active.sum() * 2 * 4
    assert out.passing.tolist() == pytest.approx(passing, abs=1e-12)
    # (eager Llama takes its softmax in float32 even for a float64 model)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
    # the gradients too
    model.zero_grad()
    out.loss.backward()
    want.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4,
                                       atol=1e-5 * q.grad.abs().max().item(), msg=n)


# ----------------------------------------------------------------------------- trainer / CLI


def _first_step_items(task, tok):
    """The encoded prompts of the trainer's first step at train_prompts=4, batch=4, seed=3, in
    the order it collates them (shortest first)."""
    enc = data.encode(tok, data.training_prompts(task, 4, 4, seed=3))
    order = trainer._Order(len(enc), 3)
    return sorted((enc[i] for i in order.take(4)), key=lambda e: len(e.input_ids))


def test_multi_query_off_is_bitwise_the_paper_loss(task, tok):
    """With multi_query off the trainer's step loss is bitwise ``abft_loss`` on ``collate``'s
    batch (the code path of before the option), and the run's fingerprint config is unchanged."""
    model = llama(tok, qk_scale=20.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = trainer.TrainConfig(train_prompts=4, steps=1, batch=4, micro_batch=4, lr=1e-3, seed=3)
    assert cfg.multi_query is False and "multi_query" not in trainer._fingerprint_config(cfg)
    res = trainer.train(model, tok, task, cfg, progress=False)
    items = _first_step_items(task, tok)
    fresh = llama(tok)
    fresh.load_state_dict(state)
    b = data.collate(items, tok.pad_token_id)
    with torch.no_grad():
        probs = trainer.ProbeForward(fresh)(b.input_ids, b.attention_mask, b.rows, b.cols)
    out = abft_loss(probs, b.correct, b.cols >= 0, b.lengths, A=0.5, B=1.0)
    assert res.history[0]["loss"] == out.loss.item()          # bitwise
    assert res.history[0]["passing_heads"] == out.passing.sum().item() / 4
    assert res.config["multi_query"] is False
    cfg_mq = trainer.TrainConfig(multi_query=True)
    assert trainer._fingerprint_config(cfg_mq)["multi_query"] is True
    with pytest.raises(ValueError, match="multi_query must be a bool"):
        trainer.TrainConfig(multi_query=1).check()


def test_multi_query_training_step(task, tok):
    model = llama(tok, qk_scale=20.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = trainer.TrainConfig(train_prompts=4, steps=1, batch=4, micro_batch=4, lr=1e-3, seed=3,
                              multi_query=True, use_filter=False, use_pid=False)
    res = trainer.train(model, tok, task, cfg, progress=False)
    items = _first_step_items(task, tok)
    fresh = llama(tok)
    fresh.load_state_dict(state)
    mb = data.collate_multi_query(items, tok.pad_token_id)
    with torch.no_grad():
        probs = trainer.ProbeForward(fresh)(mb.input_ids, mb.attention_mask, mb.rows, mb.cols)
    out = multi_query_loss(probs, mb.row_correct, mb.row_valid, mb.row_lengths, mb.row_active,
                           use_filter=False)
    h = res.history[0]
    assert h["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    assert h["passing_heads"] == 2 * 4  # no filter: every head of the 2 layers at every row
    with torch.no_grad():
        probs = trainer.ProbeForward(model)(mb.input_ids, mb.attention_mask, mb.rows, mb.cols)
    after = multi_query_loss(probs, mb.row_correct, mb.row_valid, mb.row_lengths,
                             mb.row_active, use_filter=False)
    assert after.loss.item() < out.loss.item()


def test_cli_two_steps_with_multi_query(task, tmp_path, capsys):
    model_dir = save_tiny_llama(tmp_path / "tiny", [" ".join(e.inputs) for e in task.pool])
    out = tmp_path / "run"
    cli.main(["train", "--model", model_dir, "--dataset", "sst2", "--train-prompts", "4",
              "--steps", "2", "--batch", "2", "--micro-batch", "2", "--lr", "1e-3",
              "--eval-queries", "3", "--backend", "torch", "--multi-query", "--no-plots",
              "--out", str(out), "--no-progress"])
    assert "accuracy after:" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["multi_query"] is True
    assert [h["step"] for h in rep["history"]] == [1, 2]
    assert all(math.isfinite(h["loss"]) for h in rep["history"])
    assert (out / "qk.safetensors").stat().st_size > 0
