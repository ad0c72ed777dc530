"""The classifier's gap to naive Bayes (docs/classifier_gap.md): the `best` preset alone, with MLM pretraining, with token
dropout, with both, each also with an exponential moving average of its weights (checkpoint averaging along the
run), and seed ensembles; docs/classifier_gap.md's table comes from this script.

    OMP_NUM_THREADS=1 python bench/classifier_gap.py --data-dir DIR --out results/classifier_gap [--seeds 42,43,44]
    OMP_NUM_THREADS=1 python bench/classifier_gap.py --data-dir DIR --tune --mlm-steps 1000,2500 --mlm-lr 1e-3,3e-3
    OMP_NUM_THREADS=1 python bench/classifier_gap.py --data-dir DIR --tune --rows dropout+ema --ema-decay 0.99,0.998

Every row fine-tunes with training.PRESETS["best"] (selection run on the stratified 10% validation split, refit on
all of train_CLS.tsv). --tune runs selection runs only (no refit) on a grid and prints validation figures only:
that is how the pretraining's steps and learning rate, the token dropout rate and the average's decay were chosen.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import training
import utilities
from dataset import token_dropout
from models import averaging
from runtime.memory import keep_freed_memory
from studies import pretraining, workers
from transformer import TransformerClassifier

# row -> (pretrain the encoder first, token dropout on, evaluate a moving average of the weights); the rates and the
# decay come from the command line
ROWS = {"best": (False, False, False), "mlm": (True, False, False), "dropout": (False, True, False),
        "mlm+dropout": (True, True, False), "dropout+ema": (False, True, True), "mlm+ema": (True, False, True),
        "mlm+dropout+ema": (True, True, True)}
COLUMNS = ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen", "test_accuracy_unseen_both")


def pretrained_encoder(run, config, settings, masking, seed: int, cache: Path) -> tuple:
    """pretraining.pretrain's (MaskedLM, report) for these arguments, kept in `cache` so that every mlm row of
    a seed (mlm, mlm+dropout, mlm+ema, ...) pretrains once (pretraining is deterministic: the same weights either way)."""
    path = cache / f"mlm_seed{seed}_steps{masking.steps}_lr{masking.learning_rate:g}_val{settings.validation_fraction:g}.pt"
    if path.exists():
        mlm_config, state, report = torch.load(path, weights_only=False)
        mlm = pretraining.MaskedLM(mlm_config)
        mlm.load_state_dict(state)
        return mlm, report
    mlm, report = pretraining.pretrain(run, config, masking, seed, pretraining.validation_segments(run, settings),
                                       log=lambda *a, **k: None)
    utilities.atomic_write(path, lambda temporary: torch.save((mlm.config, mlm.state_dict(), report), temporary))
    return mlm, report


def job_path(job: tuple, out: Path) -> Path:
    """Where a final job's result is kept: a later invocation with more seeds or rows reuses it (runs are deterministic)."""
    row, seed, masking, rate, decay, _, _ = job
    pretrain, drop, average = ROWS[row]
    name = (row + (f"_steps{masking.steps}_lr{masking.learning_rate:g}" if pretrain else "") + (f"_p{rate:g}" if drop else "")
            + (f"_ema{decay:g}" if average else ""))
    return out / "runs" / f"{name}_seed{seed}.json"


def train_row(job: tuple) -> tuple[tuple, dict]:
    """One (row, seed, masking, token dropout, decay, refit, cache folder) job in a worker: figures, validation
    accuracy, probabilities; its seconds are the training's (pretraining included, even when it came from the cache)."""
    row, seed, masking, dropout_rate, decay, refit, cache = job
    run = workers.worker_run()
    pretrain, drop, average = ROWS[row]
    wrap_builder = partial(averaging.ema_builder, decay, model_class=TransformerClassifier) if average else None
    config = training.model_config(run, "classifier", preset="best")
    settings = replace(training.training_config(run, "classifier", preset="best"), refit=refit)
    wrap_batches = token_dropout(dropout_rate) if drop else None
    quiet = lambda *a, **k: None  # noqa: E731
    started = time.perf_counter()
    if pretrain:
        pretrained = pretrained_encoder(run, config, settings, masking, seed, cache)
        trained, pretrained_report = pretraining.train_pretrained_classifier(
            run, config, settings, masking, seed, quiet, pretrained, wrap_builder=wrap_builder, wrap_batches=wrap_batches)
    else:
        trained = training.train_classifier(run, config, settings, seed, log=quiet,
                                            build_model=wrap_builder() if wrap_builder else None, wrap_batches=wrap_batches)
    model = trained.model
    best = training.best_evaluation(trained.selection or trained.history)
    result = {"validation_accuracy": best["validation_accuracy"], "chosen_epoch": best["epoch"],
              "seconds": trained.train_seconds, "wall_seconds": time.perf_counter() - started}
    if pretrain:
        result["mlm"] = [{k: r[k] for k in ("step", "train_loss", "validation_loss")} for r in pretrained_report["history"]]
        result["pretraining_seconds"] = pretrained_report["seconds"]
    if refit:  # test figures only for the final rows; --tune never looks at them
        ids, _ = training.classifier_tensors(run, run.data.test_cls, config.block_size)
        probabilities = training.predict(model, ids, run.device)
        result.update(training.classifier_report(run, probabilities), probabilities=probabilities.tolist())
    return job, result


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def cell(entry: dict) -> str:
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}" if len(entry["values"]) > 1 else f"{entry['mean']:.2f}"


def summarise(run, results: dict, seeds: list[int]) -> tuple[dict, str]:
    """Per row: mean ± std over seeds and the seed ensemble (mean of the probabilities); the Markdown table."""
    summary, lines = {}, []
    for row, per_seed in results.items():
        entry = {key: spread([r[key] for r in per_seed]) for key in ("validation_accuracy", "seconds", *COLUMNS)}
        ensemble = torch.tensor([r["probabilities"] for r in per_seed]).mean(0)
        entry["ensemble"] = {k: v for k, v in training.classifier_report(run, ensemble).items() if k in COLUMNS}
        entry["chosen_epochs"] = [r["chosen_epoch"] for r in per_seed]
        summary[row] = entry
    chosen = max(summary, key=lambda row: summary[row]["validation_accuracy"]["mean"])
    header = ["classifier", "validation acc %", "test acc %", "seen %", "unseen %", "in neither %", "seconds per seed"]
    for row, entry in summary.items():
        lines.append([row, cell(entry["validation_accuracy"]), *(cell(entry[key]) for key in COLUMNS), cell(entry["seconds"])])
    for row, entry in summary.items() if len(seeds) > 1 else ():
        mark = " (best on validation)" if row == chosen else ""
        lines.append([f"{row}, ensemble of {len(seeds)}{mark}", "", *(f"{entry['ensemble'][key]:.2f}" for key in COLUMNS),
                      f"{sum(entry['seconds']['values']):.0f} (all seeds)"])
    return {"rows": summary, "best_on_validation": chosen}, utilities.markdown_table(header, lines)


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--out", type=Path, default=Path("results/classifier_gap"))
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--mlm-steps", default="2000", help="pretraining steps (a list with --tune)")
    parser.add_argument("--mlm-lr", default="1e-3", help="pretraining learning rate (a list with --tune)")
    parser.add_argument("--token-dropout", default="0.1", help="token dropout rate (a list with --tune)")
    parser.add_argument("--ema-decay", default="0.99", help="the weight average's decay per step (a list with --tune)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one thread each")
    parser.add_argument("--tune", action="store_true", help="selection runs on the grid, validation figures only")
    return parser


def jobs_of(args) -> list[tuple]:
    """The grid (--tune: every combination of the listed values) or the final rows, as worker jobs."""
    seeds, rows = [int(s) for s in args.seeds.split(",")], args.rows.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    steps, rates, dropouts = [int(v) for v in floats(args.mlm_steps)], floats(args.mlm_lr), floats(args.token_dropout)
    decays = floats(args.ema_decay)
    if not args.tune and max(len(steps), len(rates), len(dropouts), len(decays)) > 1:
        raise ValueError("lists of --mlm-steps, --mlm-lr, --token-dropout or --ema-decay values are for --tune only")
    if not all(0 < decay < 1 for decay in decays):
        raise ValueError(f"--ema-decay values must be in (0, 1), got {args.ema_decay}")
    maskings = [pretraining.MaskingConfig(steps=s, learning_rate=r).validate() for s in steps for r in rates]
    jobs = []
    for row in rows:
        pretrain, drop, average = ROWS[row]
        for masking, rate, decay in itertools.product(maskings if pretrain else maskings[:1],
                                                      dropouts if drop else dropouts[:1], decays if average else decays[:1]):
            jobs += [(row, seed, masking, rate, decay, not args.tune, args.out / "pretrained") for seed in seeds]
    return jobs


def main_bench(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # the process setting main.py makes
    try:
        jobs = jobs_of(args)
        settings = training.RunSettings(data_dir=args.data_dir, out=args.out)
        run = training.build_run(settings)
    except ValueError as error:  # DataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    started, done, tuning = time.perf_counter(), {}, []
    kept = {} if args.tune else {job: json.loads(job_path(job, args.out).read_text()) for job in jobs
                                 if job_path(job, args.out).exists()}
    fresh = workers.map_jobs(settings, [job for job in jobs if job not in kept], args.workers, train_row)
    for job, result in itertools.chain(kept.items(), fresh):  # fresh results print and save as they come
        row, seed, masking, rate, decay, *_ = job
        if not args.tune and job not in kept:
            utilities.write_json(job_path(job, args.out), result)
        pretrain, drop, average = ROWS[row]
        label = (row + (f" steps={masking.steps} lr={masking.learning_rate:g}" if pretrain else "")
                 + (f" p={rate:g}" if drop else "") + (f" decay={decay:g}" if average else ""))
        mlm = f", MLM validation loss {result['mlm'][-1]['validation_loss']:.3f}" if pretrain else ""
        print(f"{label:40s} seed {seed}: validation {result['validation_accuracy']:.2f}% (epoch {result['chosen_epoch']})"
              f"{mlm}, {result['seconds']:.0f} s" + ("" if args.tune else f", test {result['test_accuracy']:.2f}%")
              + (" (kept from an earlier invocation)" if job in kept else ""), flush=True)
        tuning.append({"row": label, "seed": seed, **{k: v for k, v in result.items() if k != "probabilities"}})
        done[job] = result
    if args.tune:
        path = utilities.write_json(args.out / "classifier_gap_tune.json", tuning)
        print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
        return 0
    results = {}
    for job in sorted(jobs, key=lambda job: list(ROWS).index(job[0])):  # the table's rows in ROWS's order
        results.setdefault(job[0], []).append(done[job])
    summary, table = summarise(run, results, [int(s) for s in args.seeds.split(",")])
    print(table)
    utilities.write_text(args.out / "classifier_gap.md", table + "\n")
    settings = {"mlm_steps": args.mlm_steps, "mlm_lr": args.mlm_lr, "token_dropout": args.token_dropout,
                "ema_decay": args.ema_decay, "seeds": args.seeds,
                "seconds": time.perf_counter() - started}
    path = utilities.write_json(args.out / "classifier_gap.json", {"settings": settings, **summary, "runs": tuning})
    print(f"wrote {path} ({settings['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
