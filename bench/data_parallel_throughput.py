"""Training tokens per second of part two with 1 and N data parallel processes (torchrun, gloo on CPU).

python bench/data_parallel_throughput.py [--data-dir DIR] [--processes 2] [--max-iters 300] [extra main.py flags]

Reads the step times from each run's --log-dir JSON lines and counts only the steps between evaluations
(process 0 evaluates while the others wait), so the figure is the training step's throughput.
Not a timed test: on a shared machine the numbers move with its load.
"""

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tokens_per_second(log: Path, tokens_per_step: int) -> float:
    """Tokens over seconds of the steps whose previous step was not followed by an evaluation."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    evaluated = {row["step"] for row in rows if "evaluation" in row}
    steps = [row for row in rows if "loss" in row]
    seconds = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(steps) if a["step"] not in evaluated]
    return tokens_per_step * len(seconds) / sum(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "speechesdataset"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    args, extra = parser.parse_known_args()
    flags = ["--part", "two", "--data-dir", args.data_dir, "--max-iters", str(args.max_iters), "--eval-interval",
             str(args.max_iters), "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
             "--no-plots", "--quiet", *extra]
    for processes in (1, args.processes):
        with tempfile.TemporaryDirectory() as out:
            launcher = [sys.executable] if processes == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
            subprocess.run([*launcher, str(ROOT / "main.py"), *flags, "--out", out, "--log-dir", f"{out}/log"],
                           check=True, stdout=subprocess.DEVNULL)
            rate = tokens_per_second(Path(out) / "log" / "part_two.jsonl", args.batch_size * args.block_size)
            print(f"{processes} process{'es' if processes > 1 else ''}: {rate:,.0f} training tokens/s")


if __name__ == "__main__":
    main()
