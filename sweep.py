"""Second-round validation sweep of the `best` preset: the exploration's winners on top of the first round.

    python sweep.py --data-dir DIR --task classifier|lm [--seeds 42,43,44] [--candidates a,b]

Every candidate is a selection run on the validation split (10% of train_CLS.tsv, stratified, or the last
10% of train_LM.txt), without refit; it prints the best validation figure and its epoch or iteration, never
a test figure. The second-round table of docs/improvement.md comes from this script.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

import main
import training
from dataset import DataError

# the first round's classifier settings differ from today's preset in these two options only
FIRST_ROUND = {"classifier": {"feedforward": "gelu", "position": "learned"}, "lm": {}}
CANDIDATES = {
    "none": {},
    "rope": {"position": "rope"},
    "disentangled": {"position": "disentangled"},
    "swiglu": {"feedforward": "swiglu"},
    "rope+swiglu": {"position": "rope", "feedforward": "swiglu"},
    "disentangled+swiglu": {"position": "disentangled", "feedforward": "swiglu"},
    "no-position": {"position": "none"},
    "no-position+swiglu": {"position": "none", "feedforward": "swiglu"},
}


# task -> (train function, its evaluation rows, the step of a row, the validation figure of a row)
TASKS = {"classifier": (training.train_classifier, "epochs", "epoch", "validation_accuracy"),
         "lm": (training.train_language_model, "evals", "iteration", "validation_perplexity")}


def best_validation(run, task: str, changes: dict, seed: int) -> tuple[int, float]:
    """(epoch or iteration, validation figure) of the best evaluation of one selection run."""
    config = training.model_config(run, task, preset="best", **{**FIRST_ROUND[task], **changes})
    settings = replace(training.training_config(run, task, preset="best"), refit=False)
    train, rows, step, figure = TASKS[task]
    _, report = train(run, config, settings, seed, log=lambda *a, **k: None)
    best = training.best_evaluation(report[rows])
    return best[step], best[figure]


def seed_list(text: str) -> list[int]:
    """--seeds 42,43,44 -> [42, 43, 44]."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def main_sweep(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--seeds", type=seed_list, default=[42], help="comma-separated seeds (default 42)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma-separated subset of: {', '.join(CANDIDATES)}")
    args = parser.parse_args(argv)
    names = args.candidates.split(",")
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate {unknown[0]!r}")
    torch.set_num_threads(1)  # as the --improve workers train
    try:
        run = training.make_run(main.build_parser().parse_args(["--part", "two", "--data-dir", str(args.data_dir),
                                                                  "--device", args.device]))
    except (DataError, ValueError) as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    unit = "ppl" if args.task == "lm" else "acc %"
    for name in names:
        for seed in args.seeds:
            step, value = best_validation(run, args.task, CANDIDATES[name], seed)
            print(f"{args.task:10s} {name:22s} seed {seed}: best validation {unit} {value:.2f} at {step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_sweep())
