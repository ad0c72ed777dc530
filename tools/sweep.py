"""`main.py sweep`: the validation figures of the `best` preset's second-round candidates (studies/sweep.py)."""

import argparse
import sys
from pathlib import Path

import torch

import training
from dataset import DataError
from studies import sweep
from tools.cli import Parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of `main.py sweep`."""
    parser = Parser(prog="main.py sweep", description=sweep.__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sweep.TASKS, required=True)
    parser.add_argument("--data-dir", type=Path, help="as for main.py --part (default: speechesdataset/ or the stand-in)")
    parser.add_argument("--seed", type=int, default=42, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per candidate, from --seed on (as for --part three)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument("--candidates", default=",".join(sweep.CANDIDATES),
                        help=f"comma-separated subset of: {', '.join(sweep.CANDIDATES)}")
    return parser


def command(argv) -> int:
    """python main.py sweep --task classifier|lm [...]: validation figures of the best preset's candidates."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.candidates.split(",")
    unknown = [name for name in names if name not in sweep.CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate {unknown[0]!r}")
    if args.seeds < 1:
        parser.error(f"--seeds must be positive, got {args.seeds}")
    torch.set_num_threads(1)  # as the --improve workers train
    try:
        run = training.make_run(data_dir=args.data_dir, device=args.device)
    except (DataError, ValueError, OSError) as error:
        print(f"main.py sweep: error: {error}", file=sys.stderr)
        return 2
    sweep.print_best_validations(run, args.task, names, range(args.seed, args.seed + args.seeds))
    return 0
