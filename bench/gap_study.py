"""The gap study on the course data without the rest of part three (the same code as `main.py --part three --gap`).

    OMP_NUM_THREADS=1 python bench/gap_study.py --data-dir DIR --out results/gap [--seed 42]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import training
import utilities
from runtime.memory import keep_freed_memory
from studies import gap

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--out", type=Path, default=Path("results/gap"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--decoders", default=",".join(gap.HEADLINE),
                        help="comma-separated rows of gap.DECODERS (default: gap.HEADLINE, the rows --gap trains)")
    args = parser.parse_args()
    keep_freed_memory()  # the process setting main.py makes
    unknown = [name for name in args.decoders.split(",") if name not in gap.DECODERS]
    if unknown:
        parser.error(f"unknown decoder row(s) {', '.join(unknown)}; the rows are {', '.join(gap.DECODERS)}")
    run = training.make_run(data_dir=args.data_dir, out=args.out)
    result = gap.study(run, args.seed, args.decoders.split(","))
    utilities.write_tables(gap.tables(result), args.out)
    gap.plot(result, args.out)
    print(f"wrote {utilities.write_json(args.out / 'gap.json', result)} ({result['seconds']:.0f} s)")
