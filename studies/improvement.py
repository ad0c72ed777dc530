"""The improvement: naive Bayes, TF-IDF logistic regression and Kneser–Ney against the course base model and the
`best` preset, on both tasks, the same seeds (docs/improvement.md).
"""

import statistics
import time
from pathlib import Path

import torch

import training
import utilities
from dataset import TEST_LM
from studies import baselines, gap
from studies.study import Context, Study
from studies.workers import Job, cell, run_jobs, spread

CLASSIFIER_COLUMNS = ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen", "test_accuracy_unseen_both")


def summarise_improve(run, task: str, reports: list[dict]) -> dict:
    """Mean and spread over seeds; for the classifier also the seed ensemble (mean of the probabilities)."""
    summary = {"num_parameters": reports[0]["num_parameters"], "train_seconds": spread([r["train_seconds"] for r in reports])}
    if task == "classifier":
        # a split with no segments (None: the stand-in has no test segment seen in training) stays None
        summary.update({key: spread([r[key] for r in reports]) if reports[0][key] is not None else None
                        for key in CLASSIFIER_COLUMNS})
        ensemble = torch.tensor([r["probabilities"] for r in reports]).mean(0)
        summary["ensemble"] = {key: value for key, value in training.classifier_report(run, ensemble).items()
                               if key in CLASSIFIER_COLUMNS}
        if reports[0]["chosen"] is not None:
            summary["chosen"] = [r["chosen"] for r in reports]
        return summary
    summary["perplexity"] = {name: spread([r["perplexity"][name] for r in reports]) for name in reports[0]["perplexity"]}
    if reports[0]["chosen"] is not None:
        summary["chosen"] = [r["chosen"] for r in reports]
    # the selection run's curve (with validation) where there is one: it is what chose the stopping point
    summary["curves"] = [[{k: row[k] for k in ("iteration", "validation_perplexity", "perplexity") if k in row}
                          for row in r["curve"]] for r in reports]
    return summary


def improve(run: training.Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """The non-neural baselines, the course base model and the `best` preset, on both tasks, same seeds."""
    seeds, workers = context.seeds, context.workers
    started = time.perf_counter()
    classifier = baselines.classifier_baselines(run.data, run.words, seed=0)
    results = {"classifier": {name: classifier[name] for name in ("naive_bayes", "tfidf_logreg")},
               "lm": baselines.lm_baseline(run.data, run.words)}
    word_level = run.tokenizer is run.words  # the gap buckets words
    jobs = [Job(task, preset, context.seed + offset, preset=preset, gap=word_level and task == "lm" and preset == "best")
            for task in ("classifier", "lm") for preset in ("base", "best") for offset in range(seeds)]
    log(f"improvement: {len(jobs)} training runs (base and best x {seeds} seeds x 2 tasks) on {workers} workers")
    runs, failures = run_jobs(run.settings, jobs, workers, log)
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
    """A table cell: a spread over seeds, a single figure, or empty for a split with no segments."""
    value = entry[key]
    return cell(value) if isinstance(value, dict) else "" if value is None else f"{value:.2f}"


def improve_tables(results: dict) -> dict[str, str]:
    """Markdown tables: baselines, base and best side by side, per task."""
    rows = []
    for name, entry in results["classifier"].items():
        rows.append([name, *(_value(entry, key) for key in CLASSIFIER_COLUMNS)])
        if "ensemble" in entry:
            rows.append([f"{name} (ensemble of {results['seeds']})",
                         *(_value(entry["ensemble"], key) for key in CLASSIFIER_COLUMNS)])
    classifier = utilities.markdown_table(["classifier", "test acc %", "seen %", "unseen %", "in neither file %"], rows)
    rows = [[name, *(_value(entry["perplexity"], test) for test in TEST_LM)]
            for name, entry in results["lm"].items()]
    lm = utilities.markdown_table(["language model", *TEST_LM], rows)
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


STUDY = Study("improve", "improve", "improvement",
              "also compare baselines, the course model and the best preset (training.PRESETS), --seeds seeds each",
              improve, lambda results: {f"improve_{name}": table for name, table in improve_tables(results).items()},
              plot_improve)
