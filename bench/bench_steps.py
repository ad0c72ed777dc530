"""Time one training step of the course's base models: fp32, bf16 or fp16 autocast, torch.compile, other LayerNorms.

    python bench/bench_steps.py [--steps 200] [--threads 1] [--device cpu|cuda] [--cases fp32,bf16,compile]
    python bench/bench_steps.py --cases fp32,norm-hand,norm-torch      # what our own LayerNorm costs

Each case trains the default-size classifier (batch 16 x 32 tokens, padded) or decoder (5,635-word head) with the
same step as training.fit (autocast forward, fused AdamW). The first step of a compiled model includes compilation;
"pays after" is the number of steps after which compilation has cost less than the steps it saved.
Times are CPU seconds of this process (steady on a shared machine) and wall seconds; the ratios use CPU seconds on
the CPU and wall seconds on a GPU (where the process mostly waits for the device).
The norm-* cases are fp32 eager with every LayerNorm's forward replaced, to price ours (docs/training.md): norm-hand
is the same formula as an autograd function with a hand-derived backward (fewer kernels, other rounding), norm-torch
is torch's fused F.layer_norm. Neither is used by the models.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from any folder
from runtime.parallel import SINGLE
from training import autocast, compiled
from transformer import LayerNorm, TransformerClassifier, TransformerConfig, TransformerLM

VOCABULARY = 5635  # the course's word vocabulary


def batch(task: str, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCABULARY, (16, 32), generator=generator)
    if task == "classifier":
        lengths = torch.randint(8, 33, (16, 1), generator=generator)
        ids = ids.masked_fill(torch.arange(32) >= lengths, 0)  # right padding, as encode_segments does
        return ids.to(device), torch.randint(0, 3, (16,), generator=generator).to(device)
    return ids.to(device), torch.randint(2, VOCABULARY, (16, 32), generator=generator).to(device)


class HandDerivedLayerNorm(torch.autograd.Function):
    """Our LayerNorm's formula with its backward written out: dx = rstd (g w - mean(g w) - x̂ mean(g w x̂))."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        centred = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        normed = centred * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight + bias

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_normed = grad * weight
        grad_x = rstd * (grad_normed - grad_normed.mean(-1, keepdim=True)
                         - normed * (grad_normed * normed).mean(-1, keepdim=True))
        rows = tuple(range(grad.dim() - 1))
        return grad_x, (grad * normed).sum(rows), grad.sum(rows), None


class HandLayerNorm(LayerNorm):
    def forward(self, x):
        return HandDerivedLayerNorm.apply(x, self.weight, self.bias, self.eps)


class TorchLayerNorm(LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


NORMS = {"ours": LayerNorm, "hand": HandLayerNorm, "torch": TorchLayerNorm}


def use_norm(model: torch.nn.Module, norm: str) -> torch.nn.Module:
    """`model` with every LayerNorm's forward that of NORMS[norm]: the same parameters, another forward."""
    for module in model.modules():
        if type(module) is LayerNorm:
            module.__class__ = NORMS[norm]
    return model


def time_steps(task: str, precision: str, compile_it: bool, steps: int, device, norm: str = "ours") -> dict:
    """Seconds of the first step (compilation included) and the mean of the next `steps` (after 10 warm-up steps)."""
    torch.manual_seed(0)
    model_class = TransformerClassifier if task == "classifier" else TransformerLM
    model = use_norm(model_class(TransformerConfig(vocab_size=VOCABULARY)).to(device).train(), norm)
    forward = compiled(model, device, SINGLE) if compile_it else model  # what --compile does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as training.fit: fp16 needs one
    generator = torch.Generator().manual_seed(0)
    batches = [batch(task, generator, device) for _ in range(8)]

    def step(i):
        inputs, targets = batches[i % len(batches)]
        with autocast(device, precision):
            loss = forward(inputs, targets).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # waits for the GPU, as fit's bookkeeping does

    clocks = (time.process_time, time.perf_counter)
    begin = [clock() for clock in clocks]
    step(0)
    first = [clock() - b for clock, b in zip(clocks, begin)]
    for i in range(10):
        step(i + 1)
    begin = [clock() for clock in clocks]
    for i in range(steps):
        step(i)
    per_step = [(clock() - b) / steps for clock, b in zip(clocks, begin)]
    return {"first_cpu": first[0], "first_wall": first[1], "step_cpu": per_step[0], "step_wall": per_step[1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="fp32,bf16,compile",
                        help="comma-separated: fp32, bf16, fp16 (CUDA only), compile, compile-bf16, norm-hand, norm-torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = {"fp32": ("fp32", False, "ours"), "bf16": ("bf16", False, "ours"), "fp16": ("fp16", False, "ours"),
             "compile": ("fp32", True, "ours"), "compile-bf16": ("bf16", True, "ours"),
             "norm-hand": ("fp32", False, "hand"), "norm-torch": ("fp32", False, "torch")}
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown or ("fp16" in args.cases and device.type != "cuda"):
        parser.error(f"--cases takes a comma-separated subset of {', '.join(cases)} (fp16 on CUDA only)")
    clock = "step_wall" if device.type == "cuda" else "step_cpu"  # a GPU step's CPU time is mostly waiting
    print(f"{args.steps} steps, {args.threads} thread(s), {device}")
    print("| model | case | first step s (CPU / wall) | ms per step (CPU / wall) | vs fp32 eager | pays after |")
    print("|---|---|---|---|---|---|")
    for task in ("classifier", "lm"):
        base = None
        for name in args.cases.split(","):
            precision, compile_it, norm = cases[name]
            result = time_steps(task, precision, compile_it, args.steps, device, norm)
            base = base or result
            speedup = base[clock] / result[clock]
            saved = base[clock] - result[clock]
            first = clock.replace("step", "first")
            pays = f"{(result[first] - base[first]) / saved:,.0f} steps" if compile_it and saved > 0 else "-"
            print(f"| {task} | {name} | {result['first_cpu']:.2f} / {result['first_wall']:.2f} | "
                  f"{1e3 * result['step_cpu']:.2f} / {1e3 * result['step_wall']:.2f} | {speedup:.2f}x | {pays} |", flush=True)


if __name__ == "__main__":
    main()
