"""Whole-process time of `main.py --part one|two` against the plain yardstick, alternating runs, median of N.

    python bench/speed_vs_plain.py --data-dir DATA_DIR [--repeats 3] [--parts one,two] [--threads 1]

The yardstick is ../shared/bench/plain_course.py (a ~100-line implementation of the same models, training and
evaluation schedule: see its docstring). Each repeat runs `python main.py --part P --out TMP` (with its plots and
heatmaps, as a learner runs it; `--main-args --no-plots` leaves them out) and then the yardstick, so a change in
the machine's load hits both alike. Wall time is what the target ratios are; CPU time (user + system of the
child) is printed beside it because it moves much less on a shared machine.

main.py sets glibc's malloc to keep freed blocks (runtime/memory.py); the yardstick does not. So that the
ratio is not read as a model or loop advantage, each repeat also runs the yardstick with the same setting given
through glibc's environment variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): a third program per
repeat, the table's last two columns.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from runtime.memory import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402

PLAIN = ROOT.parent / "shared" / "bench" / "plain_course.py"
TASKS = {"one": "classifier", "two": "lm"}  # our part -> the yardstick's task
SAME_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process; a failing child stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if finished.returncode:
        last = (finished.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"speed_vs_plain.py: {' '.join(command[1:3])} exited {finished.returncode}: {last}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "speechesdataset")
    parser.add_argument("--plain", type=Path, default=PLAIN, help="the yardstick script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="one,two", help="comma-separated: one, two")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: as in the environment)")
    parser.add_argument("--main-args", default="", help="extra options for main.py, e.g. '--precision bf16'")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(TASKS) or args.repeats < 1:
        parser.error(f"--parts takes a comma-separated subset of {', '.join(TASKS)}; --repeats must be positive")
    for path, what in ((args.plain, "--plain"), (args.data_dir / "train_LM.txt", "--data-dir")):
        if not path.is_file():
            parser.error(f"{what}: {path} not found")
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"threads: {env.get('OMP_NUM_THREADS', 'torch default')}; median of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for part in parts:
            ours_command = [sys.executable, "main.py", "--part", part, "--data-dir", str(args.data_dir.resolve()),
                            "--out", out, *args.main_args.split()]
            plain_command = [sys.executable, str(args.plain.resolve()), TASKS[part], str(args.data_dir.resolve())]
            ours, plain, plain_same_malloc = [], [], []
            for repeat in range(args.repeats):
                ours.append(timed(ours_command, env))
                plain.append(timed(plain_command, env))
                plain_same_malloc.append(timed(plain_command, {**env, **SAME_MALLOC}))
                print(f"  part {part} run {repeat + 1}: ours {ours[-1][0]:.1f} s wall ({ours[-1][1]:.1f} s CPU), "
                      f"plain {plain[-1][0]:.1f} s wall ({plain[-1][1]:.1f} s CPU), plain with our malloc setting "
                      f"{plain_same_malloc[-1][0]:.1f} s wall ({plain_same_malloc[-1][1]:.1f} s CPU)", flush=True)
            medians = [statistics.median(t[i] for t in runs) for runs in (ours, plain, plain_same_malloc) for i in (0, 1)]
            rows.append((part, *medians))
    print(f"load average at end: {os.getloadavg()[0]:.1f}\n")
    print("| part | ours wall s | plain wall s | ratio | ours CPU s | plain CPU s | CPU ratio "
          "| plain, our malloc setting, wall s | ratio to it |")
    print("|---|---|---|---|---|---|---|---|---|")
    for part, ours_wall, ours_cpu, plain_wall, plain_cpu, same_malloc_wall, _ in rows:
        print(f"| {part} | {ours_wall:.1f} | {plain_wall:.1f} | {ours_wall / plain_wall:.2f} | "
              f"{ours_cpu:.1f} | {plain_cpu:.1f} | {ours_cpu / plain_cpu:.2f} | {same_malloc_wall:.1f} | "
              f"{ours_wall / same_malloc_wall:.2f} |")


if __name__ == "__main__":
    main()
