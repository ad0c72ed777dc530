"""Time greedy generation with and without the KV cache on the course's default-size decoder.

    python bench/bench_generation.py [--new-tokens 200] [--threads 1]

The weights are random: speed does not depend on them. Learned positions stop at block_size (32),
so past it the window slides and every step recomputes it, cache or not; rope and alibi run with
max_context 1024 here, so the cache keeps every token and each step feeds one.
TransformerLM.forward projects every position onto the vocabulary, which dominates a full recompute
at this size (5635 x 64 per token); the "last-only" column is the fairer baseline that projects only
the position being predicted, as nanoGPT does at inference.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from any folder
from models.generation import generate
from transformer import Output, TransformerConfig, TransformerLM

CASES = [("learned", None), ("rope", None), ("rope", 1024), ("alibi", 1024)]  # (position, max_context)


class LastOnlyLM(TransformerLM):
    """The same model, but the head projects only the last position (all generation needs)."""

    def forward(self, idx, targets=None, caches=None, return_attention=False):
        h, _ = self.decoder(self.decoder.token_embedding(idx), caches=caches)
        return Output(self.lm_head(h[:, -1:]), None, None)  # (B, 1, V)


def seconds(model, prompt, new_tokens, use_cache, max_context) -> tuple[float, list[int]]:
    begin = time.perf_counter()
    tokens = generate(model, prompt, new_tokens, use_cache=use_cache, max_context=max_context)
    return time.perf_counter() - begin, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 5635, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy, {args.threads} thread(s)")
    print(f"{'position':<10}{'max_context':>12}{'cached s':>10}{'full s':>8}{'speed-up':>10}"
          f"{'last-only: cached s':>21}{'full s':>8}{'speed-up':>10}  same tokens")
    for position, max_context in CASES:
        row, outputs = f"{position:<10}{max_context or 32:>12}", []
        for model_class in (TransformerLM, LastOnlyLM):
            torch.manual_seed(0)
            model = model_class(TransformerConfig(vocab_size=5635, position=position)).eval()
            seconds(model, prompt, 8, True, max_context)  # warm-up
            cached, with_cache = seconds(model, prompt, args.new_tokens, True, max_context)
            full, without = seconds(model, prompt, args.new_tokens, False, max_context)
            row += f"{cached:>{10 if model_class is TransformerLM else 21}.3f}{full:>8.3f}{full / cached:>9.2f}x"
            outputs += [with_cache, without]
        print(f"{row}  {all(tokens == outputs[0] for tokens in outputs)}")

if __name__ == "__main__":
    main()
