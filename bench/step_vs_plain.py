"""One classifier training step of ours against the plain yardstick's, on the same batches; where the backward goes.

    python bench/step_vs_plain.py [--plain ../shared/bench/plain_course.py] [--rounds 5] [--steps 100] [--profile]

Cases, each a classifier step (batch 16 x 32 tokens, padded, as bench_steps.batch makes them): ours (fused AdamW,
as training.fit); ours with every LayerNorm's forward swapped for the hand-derived-backward or torch's fused one
(bench_steps' norm cases); the yardstick's model with its own Adam, and with our fused AdamW. The rounds alternate
between the cases, so a change in the machine's load hits all alike; the table gives the median and the fastest
round, in wall ms per step. Both programs run here with our malloc setting (runtime/memory.py).
--profile adds torch.profiler's autograd-node totals per step, ours beside the yardstick's (the profiler slows both).
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_steps import VOCABULARY, batch, use_norm  # noqa: E402  (this folder's)
from speed_vs_plain import PLAIN  # noqa: E402

from runtime.memory import keep_freed_memory  # noqa: E402
from transformer import TransformerClassifier, TransformerConfig  # noqa: E402


def ours(norm: str):
    """A step of our classifier, every LayerNorm's forward that of NORMS[norm]."""
    torch.manual_seed(0)
    model = use_norm(TransformerClassifier(TransformerConfig(vocab_size=VOCABULARY)).train(), norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)

    def step(ids, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels).loss
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def plain(module, fused: bool):
    """A step of the yardstick's classifier, with its Adam or with our fused AdamW."""
    torch.manual_seed(0)
    model = module.Model(VOCABULARY, causal=False).train()
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True) if fused
                 else torch.optim.Adam(model.parameters(), 1e-3))

    def step(ids, labels):
        loss = F.cross_entropy(model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def backward_nodes(step, batches) -> dict[str, float]:
    """Microseconds per step of each autograd node type, over one pass of `batches`."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for ids, labels in batches:
            step(ids, labels)
    prefix = "autograd::engine::evaluate_function: "
    return {event.key.removeprefix(prefix): event.cpu_time_total / len(batches)
            for event in profiler.key_averages() if event.key.startswith(prefix)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=Path, default=PLAIN, help="the yardstick script")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per case in each round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="also the backward pass's autograd nodes")
    args = parser.parse_args()
    if not args.plain.is_file():
        parser.error(f"--plain: {args.plain} not found")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be positive")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("plain_course", args.plain)
    yardstick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(yardstick)
    steps = {"ours": ours("ours"), "ours, hand-derived LayerNorm backward": ours("hand"),
             "ours, torch's fused LayerNorm": ours("torch"), "yardstick (its Adam)": plain(yardstick, False),
             "yardstick with our fused AdamW": plain(yardstick, True)}
    generator = torch.Generator().manual_seed(0)
    batches = [batch("classifier", generator, "cpu") for _ in range(20)]
    for step in steps.values():  # warm-up: the allocator, the optimiser's state, torch._dynamo's import
        for ids, labels in batches * 3:
            step(ids, labels)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for i in range(args.steps):
                step(*batches[i % len(batches)])
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    print(f"{args.rounds} rounds of {args.steps} steps, {args.threads} thread(s)")
    print("| classifier step | ms, median | ms, fastest round |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} |")
    if args.profile:
        nodes = {name: backward_nodes(steps[name], batches) for name in ("ours", "yardstick (its Adam)")}
        print("\n| autograd node | ours, µs per step | yardstick, µs per step |\n|---|---|---|")
        for node in sorted(set().union(*nodes.values()), key=lambda n: -max(t.get(n, 0.0) for t in nodes.values())):
            print(f"| {node} | {nodes['ours'].get(node, 0.0):.0f} | {nodes['yardstick (its Adam)'].get(node, 0.0):.0f} |")
        print("| total | " + " | ".join(f"{sum(t.values()):.0f}" for t in nodes.values()) + " |")


if __name__ == "__main__":
    main()
