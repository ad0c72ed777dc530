"""Max |logit difference| between transformers' GPT-2 / Llama and our conversion of them, both ways.

python bench/hf_bridge_diff.py: random models (every parameter N(0, 0.3^2)), 2 x 64 random tokens, nothing downloaded.
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utilities
from tools import hf_bridge

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
VOCAB, BLOCK = 1000, 64
SIZE = dict(n_embd=128, n_layer=4, n_head=8)


def randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def models():
    yield "GPT-2 (gelu_new, tied)", transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, **SIZE))
    for n_kv, bias in ((8, False), (2, True), (1, True)):
        yield f"Llama, {n_kv} key/value heads, biases {'on' if bias else 'off'}", transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=n_kv, max_position_embeddings=BLOCK,
                                     attention_bias=bias, mlp_bias=bias, bos_token_id=None, eos_token_id=None))


def main():
    tokens = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(0))
    print("| model | HF -> ours max abs diff | ours -> HF max abs diff | logit scale (max abs) |\n|---|---|---|---|")
    for seed, (name, theirs) in enumerate(models()):
        randomise(theirs, seed)
        with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
            scratch = Path(scratch)
            theirs.save_pretrained(scratch / "hf")
            ours = hf_bridge.model_from_folder(scratch / "hf")
            expected = theirs(tokens).logits
            forward = (ours(tokens).logits - expected).abs().max().item()
            randomise(ours, 100 + seed)
            ours.lm_head.bias.zero_()
            utilities.save_checkpoint(scratch / "ours", ours, {**ours.config.to_dict(), "model": "lm"}, '{"type": "absent"}', {})
            hf_bridge.export_checkpoint(scratch / "ours", scratch / "back")
            back = transformers.AutoModelForCausalLM.from_pretrained(scratch / "back").eval()
            backward = (back(tokens).logits - ours(tokens).logits).abs().max().item()
        print(f"| {name} | {forward:.1e} | {backward:.1e} | {expected.abs().max().item():.1f} |")


if __name__ == "__main__":
    main()
