"""Training tokens per second of the scaling study's grown decoder against a plain nanoGPT-style model of the same shape.

    python bench/scaling_throughput.py [--steps 20] [--rounds 3] [--threads 2] [--width 128] [--layers 4] [--context 128]

Both models: the shape the scaling study grows to (default width 128, 4 layers of 4 heads, context 128, GELU
feedforward 4x wide, tied embeddings, dropout 0.1), a 10,000-word head, batch 32, fused AdamW, the same random
batches. Ours is TransformerLM with the manual attention (the course's) and with `attention="sdpa"`, each with the
course's loss over the whole (B, T, V) logits and with `lm_loss="chunked"` (the scaling study's); the plain one is
written below in nanoGPT's manner: torch's fused LayerNorm and F.scaled_dot_product_attention(is_causal=True). Each
case runs in fp32 and under bf16 autocast. Rounds alternate between the cases (a machine's load hits all alike); the
figure is the median over rounds of steps / wall seconds, after one warm-up step per case.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from any folder
from training import autocast
from transformer import TransformerConfig, TransformerLM

VOCABULARY = 10_000  # sotu-all's word vocabulary
CASES = (("ours, manual attention", "manual", "full"), ("ours, sdpa attention", "sdpa", "full"),
         ("ours, manual attention, chunked loss", "manual", "chunked"), ("ours, sdpa, chunked loss", "sdpa", "chunked"))


class PlainBlock(nn.Module):
    """Pre-norm block: fused LayerNorm, causal SDPA, GELU MLP."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


class PlainGPT(nn.Module):
    """Token and position embeddings, the blocks, a final LayerNorm, a head tied to the token table."""

    def __init__(self, width: int, layers: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCABULARY, width), nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(PlainBlock(width, heads, dropout) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, VOCABULARY, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, idx, targets):
        x = self.drop(self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device)))
        logits = self.head(self.norm(self.blocks(x)))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def ours(width: int, layers: int, heads: int, context: int, dropout: float, attention: str, lm_loss: str) -> nn.Module:
    config = TransformerConfig(vocab_size=VOCABULARY, block_size=context, n_embd=width, n_head=heads, n_layer=layers,
                               ff_hidden=4 * width, feedforward="gelu", tie_embeddings=True, dropout=dropout,
                               attention=attention, lm_loss=lm_loss)
    model = TransformerLM(config)
    return lambda idx, targets: model(idx, targets).loss, model


def step_function(loss_of, model, precision: str, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step(idx, targets):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_of(idx, targets)
        loss.backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.threads, args.batch) < 1:
        parser.error("--steps, --rounds, --threads and --batch must be positive")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    shape = (args.width, args.layers, args.heads, args.context, args.dropout)
    cases = {}
    for precision in ("fp32", "bf16"):
        for name, attention, lm_loss in CASES:
            torch.manual_seed(0)
            loss_of, model = ours(*shape, attention, lm_loss)
            cases[f"{name}, {precision}"] = step_function(loss_of, model.train(), precision, device)
        torch.manual_seed(0)
        plain = PlainGPT(*shape).train()
        cases[f"plain nanoGPT-style, {precision}"] = step_function(plain, plain, precision, device)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCABULARY, (args.batch, args.context), generator=generator),
                torch.randint(0, VOCABULARY, (args.batch, args.context), generator=generator)) for _ in range(args.steps)]
    for step in cases.values():  # warm-up: the allocator, the optimiser's state
        step(*batches[0])
    rates = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, step in cases.items():
            started = time.perf_counter()
            for idx, targets in batches:
                step(idx, targets)
            rates[name].append(args.steps * args.batch * args.context / (time.perf_counter() - started))
    print(f"width {args.width}, {args.layers} layers of {args.heads} heads, context {args.context}, batch {args.batch}, "
          f"vocabulary {VOCABULARY:,}, dropout {args.dropout}; {args.threads} thread(s); median of {args.rounds} rounds "
          f"of {args.steps} steps")
    for precision in ("fp32", "bf16"):
        plain = statistics.median(rates[f"plain nanoGPT-style, {precision}"])
        for name in rates:
            if name.endswith(precision):
                rate = statistics.median(rates[name])
                print(f"  {name:44s} {rate:>9,.0f} tokens/s   {rate / plain:.2f}x the plain model's")


if __name__ == "__main__":
    main()
