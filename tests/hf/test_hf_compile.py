"""An HF model with attn_implementation="abft_fast" compiles with fullgraph=True (no graph break in
the model's forward: mask builder and attention), probes recorded, gradients equal to eager."""
import pytest
import torch

import abft_fast.hf as ah

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_llama_compiles_fullgraph_with_probes(backend):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("abft_fast")
    ids = torch.randint(0, 64, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :3] = 0  # left padding
    rows, cols = torch.tensor([[11], [11]]), torch.tensor([[3, 5], [1, 2]])
    ah.set_backend(backend)
    try:
        def step(fwd):
            with ah.probe(model, rows=rows, cols=cols) as rec:
                logits = fwd(input_ids=ids, attention_mask=am, use_cache=False).logits
            (logits.square().mean() + 3 * rec.probs.sum()).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            return logits.detach(), rec.probs.detach(), grads
        compiled = step(torch.compile(model, fullgraph=True))
        eager = step(model)
    finally:
        ah.set_backend("auto")
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
    assert compiled[1].shape == (2, 2, 4, 1, 2)
    for a, b in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
