"""Part three's studies: the exploration (every variant one switch away from the base model) and the
improvement (non-neural baselines, the course model and the best preset), measured side by side.

Kept apart from main.py, which stays the thin shell; every run goes through training.py's shared
train/evaluate functions in a worker process, so a variant differs from the base model only in its config.
"""

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import gap
import training
import utilities
from transformer import AttentionMask, TransformerConfig

# name -> (config changes from the base model, tasks it applies to). One change per row.
VARIANTS = {
    "base": ({}, ("classifier", "lm")),
    "sinusoidal": ({"position": "sinusoidal"}, ("classifier", "lm")),
    "rope": ({"position": "rope"}, ("classifier", "lm")),
    "alibi": ({"position": "alibi"}, ("classifier", "lm")),
    "no-position": ({"position": "none"}, ("classifier", "lm")),
    "disentangled": ({"position": "disentangled"}, ("classifier", "lm")),
    "rmsnorm": ({"norm": "rms"}, ("classifier", "lm")),
    "post-norm": ({"norm_placement": "post"}, ("classifier", "lm")),
    "gelu": ({"feedforward": "gelu"}, ("classifier", "lm")),
    "swiglu": ({"feedforward": "swiglu"}, ("classifier", "lm")),
    "multi-query": ({"n_kv_heads": 1}, ("classifier", "lm")),
    "local-window": ({"attention_pattern": "local"}, ("classifier", "lm")),
    "blockwise": ({"attention_pattern": "block"}, ("classifier", "lm")),
    "cls-pooling": ({"pooling": "cls"}, ("classifier",)),
    "tied-embeddings": ({"tie_embeddings": True}, ("lm",)),
    "shared-layers": ({"share_layers": True}, ("classifier", "lm")),  # ALBERT
    "factorised-embedding": ({"embedding_dim": 16}, ("classifier", "lm")),  # ALBERT, E = n_embd / 4
}
EXTRAPOLATION_LENGTHS = (32, 64, 128)
EXTRAPOLATING = ("sinusoidal", "rope", "alibi", "no-position", "disentangled")  # learned positions stop at 32
HEATMAP_VARIANTS = ("base", "local-window", "blockwise")  # the three attention patterns, to see the masks
PATTERN_ROWS = HEATMAP_VARIANTS  # rows that report the fraction of attention scores computed


def mask_density(pattern: str, window: int, causal: bool, block_size: int) -> float:
    """Fraction of the attention scores a pattern computes, relative to full (causal) attention."""
    allowed = AttentionMask(pattern, window, causal, block_size).allowed
    full = AttentionMask("full", window, causal, block_size).allowed
    return allowed.sum().item() / full.sum().item()


# ---------------------------------------------------------------- worker processes

_WORKER = {}


def _init_worker(args):
    """Each worker reads the data once and trains on one thread, so two workers fill two cores."""
    torch.set_num_threads(1)
    training.keep_freed_memory()  # a spawned worker does not inherit main.py's malloc setting
    _WORKER["run"] = training.make_run(args, log=lambda *a: None)  # the parent process has said which data


@dataclass
class Job:
    """One training run: a task, a named set of config changes on top of a preset, a seed."""

    task: str  # classifier | lm
    name: str
    seed: int
    changes: dict = field(default_factory=dict)
    preset: str = "base"
    heatmap: bool = False
    extrapolate: bool = False
    gap: bool = False


def _train_one(job: Job) -> tuple[Job, dict]:
    """Train one job in a worker; return its report (final figures, test probabilities, check failures)."""
    run = worker_run()
    config = training.model_config(run, job.task, preset=job.preset, **job.changes)
    settings = training.training_config(run, job.task, preset=job.preset)
    quiet = lambda *a, **k: None  # noqa: E731
    prefix = f"{job.preset}_{'encoder' if job.task == 'classifier' else 'decoder'}_{job.name}"
    if job.task == "classifier":
        model, report = training.train_classifier(run, config, settings, job.seed, log=quiet)
        report.pop("epochs")
        ids, _ = training.classifier_tensors(run, run.data.test_cls, config.block_size)
        report["probabilities"] = training.predict(model, ids, run.device).tolist()  # for seed ensembles
        report["attention_failures"] = utilities.attention_check(
            model, run.tokenizer, run.data.test_cls.texts[0], False, run.device, run.heatmap_dir if job.heatmap else None, prefix)
        return job, report
    if settings.validation_fraction == 0:  # nothing to select on: evaluate once, at the end
        settings = replace(settings, eval_interval=settings.max_iters)
    model, report = training.train_language_model(run, config, settings, job.seed, log=quiet)
    final = report.pop("final")  # every figure of the returned model (the refit under --preset best)
    report.update(train_perplexity=final["train_perplexity"], perplexity=final["perplexity"], model=final["model"])
    report["attention_failures"] = utilities.attention_check(
        model, run.tokenizer, run.data.test_lm["obama"], True, run.device, run.heatmap_dir if job.heatmap else None, prefix)
    if job.gap:  # per-target NLLs, for the gap to Kneser-Ney by word frequency (gap.py)
        report["target_nlls"] = {name: gap.target_nlls(model, training.encode_stream(run, text), config.block_size,
                                                       run.device).tolist() for name, text in run.data.test_lm.items()}
    if job.extrapolate:
        report["extrapolation"] = {
            length: {name: training.perplexity(model, training.encode_stream(run, text), length, run.device)
                     for name, text in run.data.test_lm.items()} for length in EXTRAPOLATION_LENGTHS}
    return job, report


@contextmanager
def in_this_process(args):
    """A stand-in for the pool when there is one worker: the jobs run here, on one thread as a worker's do
    (so the numbers are the pool's), and the thread count and worker state are put back after."""
    threads = torch.get_num_threads()
    _init_worker(args)
    try:
        yield
    finally:
        _WORKER.clear()
        torch.set_num_threads(threads)


def worker_run() -> training.Run:
    """The Run a worker process built once from the command's options."""
    return _WORKER["run"]


def map_jobs(args, jobs: list, workers: int, work):
    """Yield work(job) -> (job, report) for every job, in order, on `workers` processes (one: in this process)."""
    if workers == 1:
        with in_this_process(args):
            yield from map(work, jobs)
        return
    # spawn, not fork: forking a process that already runs torch's thread pool can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(args,)) as pool:
        yield from pool.map(work, jobs)


def run_jobs(args, jobs: list[Job], workers: int, log=print) -> tuple[dict, list[str]]:
    """Run jobs on `workers` processes (one: in this process); return {(task, name): [report per seed]} and the
    check failures."""
    runs, failures = {}, []
    for job, report in map_jobs(args, jobs, workers, _train_one):
        failures += [f"seed {job.seed}: {failure}" for failure in report.pop("attention_failures")]
        runs.setdefault((job.task, job.name), []).append(report)
        log(f"  {job.task:10s} {job.name:16s} seed {job.seed}: " + (
            f"test acc {report['test_accuracy']:.2f}%" if job.task == "classifier"
            else "ppl " + " / ".join(f"{v:.1f}" for v in report["perplexity"].values())))
    return runs, failures


# ---------------------------------------------------------------- summarising


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(task: str, runs: list[dict]) -> dict:
    """Mean and spread over seeds of one variant's runs."""
    summary = {"num_parameters": runs[0]["num_parameters"],
               "train_seconds": _spread([r["train_seconds"] for r in runs])}
    if task == "classifier":
        for key in ("test_accuracy", "test_accuracy_unseen"):
            summary[key] = _spread([r[key] for r in runs])
        return summary
    summary["train_perplexity"] = _spread([r["train_perplexity"] for r in runs])
    summary["perplexity"] = {name: _spread([r["perplexity"][name] for r in runs]) for name in runs[0]["perplexity"]}
    if "extrapolation" in runs[0]:
        summary["extrapolation"] = {length: {name: _spread([r["extrapolation"][length][name] for r in runs])
                                             for name in runs[0]["extrapolation"][length]}
                                    for length in runs[0]["extrapolation"]}
    return summary


def _cell(spread: dict) -> str:
    return f"{spread['mean']:.2f} ± {spread['std']:.2f}"


def exploration_tables(results: dict) -> dict[str, str]:
    """Markdown tables: one per task, plus length extrapolation."""
    tables, densities = {}, results["attention_density"]
    rows = [[name, r["num_parameters"], f"{r['train_seconds']['mean']:.1f}", _cell(r["test_accuracy"]),
             _cell(r["test_accuracy_unseen"]), f"{densities[name]['classifier']:.0%}" if name in densities else ""]
            for name, r in results["classifier"].items()]
    tables["classifier"] = utilities.markdown_table(
        ["variant", "parameters", "train s", "test acc %", "unseen acc %", "scores computed"], rows)
    rows = [[name, r["num_parameters"], f"{r['train_seconds']['mean']:.1f}", _cell(r["train_perplexity"]),
             *(_cell(r["perplexity"][n]) for n in ("obama", "wbush", "hbush")),
             f"{densities[name]['lm']:.0%}" if name in densities else ""]
            for name, r in results["lm"].items()]
    tables["lm"] = utilities.markdown_table(
        ["variant", "parameters", "train s", "train ppl", "obama", "wbush", "hbush", "scores computed"], rows)
    rows = [[name] + [" / ".join(f"{r['extrapolation'][length][n]['mean']:.1f}" for n in ("obama", "wbush", "hbush"))
                      if "extrapolation" in r else "n/a (positions stop at 32)" for length in EXTRAPOLATION_LENGTHS]
            for name, r in results["lm"].items() if name == "base" or "extrapolation" in r]
    tables["extrapolation"] = utilities.markdown_table(
        ["decoder (trained on 32)"] + [f"ppl obama / wbush / hbush @ {n}" for n in EXTRAPOLATION_LENGTHS], rows)
    return tables


def _axis_limit(values: list[float]) -> float:
    """An axis half-width that shows the typical values: outliers (over 5x the median size) are left to be cut."""
    sizes = sorted(abs(v) for v in values)
    typical = [v for v in sizes if v <= 5 * sizes[len(sizes) // 2]] or sizes
    return 1.2 * max(max(typical), 1e-9)


def plot_exploration(results: dict, out: Path):
    """Bars of each variant's change from the base model per task, and perplexity against evaluation length."""
    classifier = results["classifier"]
    base = classifier["base"]["test_accuracy"]["mean"]
    change = {n: r["test_accuracy"]["mean"] - base for n, r in classifier.items()}
    spread = {n: r["test_accuracy"]["std"] for n, r in classifier.items()}
    utilities.plot_bars(change, spread, "test accuracy minus the base model's (points; bars: std over seeds)",
                        "Exploration: classifier", out / "explore_classifier.png",
                        limit=_axis_limit([abs(change[n]) + spread[n] for n in change]))
    lm = results["lm"]
    mean_ppl = {n: statistics.mean(p["mean"] for p in r["perplexity"].values()) for n, r in lm.items()}
    change = {n: 100 * (value / mean_ppl["base"] - 1) for n, value in mean_ppl.items()}
    utilities.plot_bars(change, None, "change of the mean test perplexity from the base model's (%; lower is better)",
                        "Exploration: decoder", out / "explore_lm.png", limit=_axis_limit(list(change.values())))
    series = {n: (list(EXTRAPOLATION_LENGTHS), [statistics.mean(v["mean"] for v in r["extrapolation"][k].values())
                                                for k in EXTRAPOLATION_LENGTHS])
              for n, r in lm.items() if "extrapolation" in r}
    utilities.plot_curves(series, "evaluation context (tokens); trained on 32", "mean test perplexity",
                          "Length extrapolation", out / "explore_extrapolation.png", log_y=True)


# ---------------------------------------------------------------- the exploration


def variant_names(text: str | None) -> list[str]:
    """--variants "a,b" as a list (every variant when None); ValueError for a name not in VARIANTS."""
    variants = text.split(",") if text else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return variants


def explore(args, variants: list[str], seeds: int, workers: int, log=print) -> tuple[dict, list[str]]:
    """Train every (task, variant, seed) in worker processes; return per-variant summaries and check failures."""
    variants = variant_names(",".join(variants))
    variants = ["base"] + [v for v in variants if v != "base"]  # every variant is compared with the base model
    jobs = [Job(task, variant, args.seed + offset, VARIANTS[variant][0], args.preset,
                heatmap=offset == 0 and variant in HEATMAP_VARIANTS and not args.no_plots,
                extrapolate=task == "lm" and variant in EXTRAPOLATING)
            for variant in variants for task in VARIANTS[variant][1] for offset in range(seeds)]
    log(f"exploration: {len(jobs)} training runs ({len(variants)} variants x {seeds} seeds) on {workers} workers")
    started = time.perf_counter()
    runs, failures = run_jobs(args, jobs, workers, log)
    results = {"classifier": {}, "lm": {}}
    for (task, variant), reports in runs.items():
        results[task][variant] = summarise(task, reports)
    window, block_size = TransformerConfig().window, args.block_size or TransformerConfig().block_size
    results["attention_density"] = {
        v: {task: mask_density(VARIANTS[v][0].get("attention_pattern", "full"), window, task == "lm", block_size)
            for task in ("classifier", "lm")} for v in variants if v in PATTERN_ROWS}
    results["seconds"] = time.perf_counter() - started
    results["seeds"] = seeds
    return results, failures


def worker_count(requested: int | None) -> int:
    """Worker processes: one per core by default."""
    return requested or max(1, min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------- the improvement: baselines vs base vs best

CLASSIFIER_COLUMNS = ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen", "test_accuracy_unseen_both")


def summarise_improve(run, task: str, reports: list[dict]) -> dict:
    """Mean and spread over seeds; for the classifier also the seed ensemble (mean of the probabilities)."""
    summary = {"num_parameters": reports[0]["num_parameters"], "train_seconds": _spread([r["train_seconds"] for r in reports])}
    if task == "classifier":
        summary.update({key: _spread([r[key] for r in reports]) for key in CLASSIFIER_COLUMNS})
        ensemble = torch.tensor([r["probabilities"] for r in reports]).mean(0)
        summary["ensemble"] = {key: value for key, value in training.classifier_report(run, ensemble).items()
                               if key in CLASSIFIER_COLUMNS}
        if "chosen_epochs" in reports[0]:
            summary["chosen_epochs"] = [r["chosen_epochs"] for r in reports]
        return summary
    summary["perplexity"] = {name: _spread([r["perplexity"][name] for r in reports]) for name in reports[0]["perplexity"]}
    if "best_iteration" in reports[0]:
        summary["best_iteration"] = [r["best_iteration"] for r in reports]
    # the selection run's curve (with validation) where there is one: it is what chose the stopping point
    summary["curves"] = [[{k: row[k] for k in ("iteration", "validation_perplexity", "perplexity") if k in row}
                          for row in r.get("selection_evals", r["evals"])] for r in reports]
    return summary


def improve(args, run, seeds: int, workers: int, log=print) -> tuple[dict, list[str]]:
    """The non-neural baselines, the course base model and the `best` preset, on both tasks, same seeds."""
    import baselines

    started = time.perf_counter()
    classifier = baselines.classifier_baselines(run.data, run.words, seed=0)
    results = {"classifier": {name: classifier[name] for name in ("naive_bayes", "tfidf_logreg")},
               "lm": baselines.lm_baseline(run.data, run.words)}
    word_level = run.tokenizer is run.words  # the gap buckets words
    jobs = [Job(task, preset, args.seed + offset, preset=preset, gap=word_level and task == "lm" and preset == "best")
            for task in ("classifier", "lm") for preset in ("base", "best") for offset in range(seeds)]
    log(f"improvement: {len(jobs)} training runs (base and best x {seeds} seeds x 2 tasks) on {workers} workers")
    runs, failures = run_jobs(args, jobs, workers, log)
    for (task, preset), reports in runs.items():
        if task == "lm" and reports[0].get("target_nlls"):
            results["gap"] = improve_gap(run, [r.pop("target_nlls") for r in reports])
        results[task][preset] = summarise_improve(run, task, reports)
    results["seconds"] = time.perf_counter() - started
    results["seeds"] = seeds
    return results, failures


def improve_gap(run, target_nlls: list[dict]) -> dict:
    """The best decoder's gap to both Kneser-Ney rows by word frequency, its NLLs averaged over the seeds."""
    tests = {name: run.words.encode(run.data.test_lm[name]) for name in gap.TESTS}
    rows = gap.kneser_ney_rows(run.words, run.data.train_lm, training.PRESETS["best"].lm[1]["validation_fraction"], tests)
    decoder = {name: torch.tensor([seed[name] for seed in target_nlls], dtype=torch.float64).mean(0) for name in gap.TESTS}
    buckets = gap.target_buckets_of(run.words, run.data.train_lm, tests)
    return {f"best vs {count}": {name: gap.gap_rows(buckets[name], decoder[name], rows[count]["nll"][name])
                                 for name in gap.TESTS} for count in ("kneser_ney", "kneser_ney_novel_mass")}


def _value(entry: dict, key: str) -> str:
    value = entry[key]
    return _cell(value) if isinstance(value, dict) else f"{value:.2f}"


def improve_tables(results: dict) -> dict[str, str]:
    """Markdown tables: baselines, base and best side by side, per task."""
    rows = []
    for name, entry in results["classifier"].items():
        rows.append([name, *(_value(entry, key) for key in CLASSIFIER_COLUMNS)])
        if "ensemble" in entry:
            rows.append([f"{name} (ensemble of {results['seeds']})",
                         *(f"{entry['ensemble'][key]:.2f}" for key in CLASSIFIER_COLUMNS)])
    classifier = utilities.markdown_table(["classifier", "test acc %", "seen %", "unseen %", "in neither file %"], rows)
    rows = [[name, *(_value(entry["perplexity"], test) for test in ("obama", "wbush", "hbush"))]
            for name, entry in results["lm"].items()]
    lm = utilities.markdown_table(["language model", "obama", "wbush", "hbush"], rows)
    tables = {"classifier": classifier, "lm": lm}
    for comparison, per_test in results.get("gap", {}).items():
        decoder, count = comparison.split(" vs ")
        for test, gap_rows in per_test.items():
            tables[f"gap_{test}_vs_{count}"] = gap.gap_table(gap_rows, f"{decoder} (mean of {results['seeds']} seeds)", count)
    return tables


def plot_improve(results: dict, out: Path):
    """Bars for each task, and the best decoder's validation and test perplexity against iteration."""
    def mean(entry, key):
        value = entry[key]
        return value["mean"] if isinstance(value, dict) else value
    classifier = results["classifier"]
    utilities.plot_bars({f"{n} {part}": mean(e, key) for n, e in classifier.items()
                         for part, key in (("all", "test_accuracy"), ("unseen", "test_accuracy_unseen"))}, None,
                        "test accuracy (%)", "Classifier: baselines vs transformers", out / "improve_classifier.png")
    lm = results["lm"]
    utilities.plot_bars({n: statistics.mean(mean(e["perplexity"], t) for t in e["perplexity"]) for n, e in lm.items()},
                        None, "mean test perplexity (lower is better)", "Language model: baselines vs transformers",
                        out / "improve_lm.png")
    if "best" in lm:
        curve = lm["best"]["curves"][0]
        iterations = [row["iteration"] for row in curve]
        series = {"validation (selects)": (iterations, [row["validation_perplexity"] for row in curve])}
        for test in curve[0]["perplexity"]:
            series[f"test {test}"] = (iterations, [row["perplexity"][test] for row in curve])
        utilities.plot_curves(series, "iteration", "perplexity", "Best decoder's selection run (validation held out), first seed",
                              out / "improve_lm_curve.png", log_y=True)
