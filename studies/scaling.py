"""Part three's data-scaling study: the transformers against the count models on growing slices of sotu-all.

The language models (the course base decoder, the `best` preset and the Kneser-Ney trigram) learn from nested
slices of sotu-all's training text (its lines shuffled once, then the first N word tokens); the classifiers
(the base and best encoders, naive Bayes, TF-IDF logistic regression) from nested slices of its labelled
segments. Every slice keeps its last 10% as the validation split that picks the transformers' stopping point
(and the baselines' smoothing), every model of a slice learns from the same other 90%, and every point is scored
on the same test files: the three course presidents' held-out addresses (test_LM_*.txt) and the 17-president
test_CLS.tsv. The vocabulary (sotu-all's 10,000 most frequent words) is the same at every size.
"""

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import training
import utilities
from dataset import LabelledSegments, split_lines, stratified_split
from runtime import corpus
from studies import baselines
from studies.study import Context, Option, Study
from studies.workers import map_jobs, worker_run

LM_TOKENS = (32_000, 64_000, 128_000, 256_000)  # the default run (15 minutes here); --scaling-full adds 512k, 1M, all
LM_TOKENS_FULL = (*LM_TOKENS, 512_000, 1_000_000, None)  # None: the whole training text
CLS_SEGMENTS = (500, 1_000, 2_000, 4_000)
CLS_SEGMENTS_FULL = (*CLS_SEGMENTS, 8_000, 16_000, None)
VALIDATION = 0.1
EVALUATIONS = 5  # validation evaluations per run: the best one is kept (early stopping)
TRANSFORMERS = ("base", "best")
SHUFFLE_SEED = 0


@dataclass
class SliceJob:
    """One model trained on one slice: task lm | classifier, model base | best | kneser_ney | count_classifiers."""

    task: str
    model: str
    size: int | None
    seed: int
    steps: int


def lm_slice(text: str, words, tokens: int | None) -> str:
    """The first `tokens` word tokens' worth of the text's lines, shuffled once (nested: a slice holds the smaller)."""
    lines = text.splitlines(keepends=True)
    random.Random(SHUFFLE_SEED).shuffle(lines)
    if tokens is None:
        return "".join(lines)
    kept, count = [], 0
    for line in lines:
        if count >= tokens:
            break
        kept.append(line)
        count += len(words.split(line))
    return "".join(kept)


def classifier_slice(segments: LabelledSegments, size: int | None) -> LabelledSegments:
    """The first `size` labelled segments in one fixed shuffled order (nested)."""
    order = list(range(len(segments.texts)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    order = order[:size]
    return LabelledSegments([segments.texts[i] for i in order], [segments.labels[i] for i in order])


def held_out(segments: LabelledSegments) -> tuple[LabelledSegments, list[int]]:
    """(training part, validation indices): training.stratified_split's 10%, the split the encoders use too."""
    kept, validation = stratified_split(segments.labels, VALIDATION, seed=0)
    part = LabelledSegments([segments.texts[i] for i in kept], [segments.labels[i] for i in kept])
    return part, validation.tolist()


def pooled_perplexity(perplexities: dict[str, float], targets: dict[str, int]) -> float:
    """exp of the mean NLL over every target of every test file (files weighted by their targets)."""
    total = sum(targets[name] * math.log(value) for name, value in perplexities.items())
    return math.exp(total / sum(targets.values()))


def _train_slice(job: SliceJob) -> tuple[SliceJob, dict]:
    """Train (or count) one model on one slice in a worker; return its test figures."""
    run = worker_run()
    quiet = lambda *a, **k: None  # noqa: E731
    started = time.perf_counter()
    if job.task == "lm":
        text = lm_slice(run.data.train_lm, run.words, job.size)
        sliced = replace(run, data=replace(run.data, train_lm=text))
        if job.model == "kneser_ney":  # the same 90% the decoders learn from
            train = run.words.encode(split_lines(text, VALIDATION)[0])
            model = baselines.KneserNeyTrigram(train, run.words.vocab_size)
            report = {"perplexity": {name: model.perplexity(run.words.encode(t)) for name, t in run.data.test_lm.items()}}
        else:
            config = training.model_config(sliced, "lm", preset=job.model)
            settings = replace(training.training_config(sliced, "lm", preset=job.model), max_iters=job.steps,
                               eval_interval=max(1, job.steps // EVALUATIONS), validation_fraction=VALIDATION,
                               refit=False)
            result = training.train_language_model(sliced, config, settings, job.seed, log=quiet, train_eval_tokens=20_000)
            report = {"perplexity": result.final["perplexity"], "best_iteration": result.chosen,
                      "num_parameters": result.num_parameters}
        report["train_tokens"] = len(run.words.split(split_lines(text, VALIDATION)[0]))
        report["targets"] = {name: len(run.words.split(t)) - 1 for name, t in run.data.test_lm.items()}
        report["pooled_perplexity"] = pooled_perplexity(report["perplexity"], report["targets"])
    else:
        segments = classifier_slice(run.data.train_cls, job.size)
        sliced = replace(run, data=replace(run.data, train_cls=segments))
        if job.model == "count_classifiers":  # tuned on the same validation 10%, refit on the training 90%
            part, _ = held_out(segments)
            found = baselines.classifier_baselines(replace(run.data, train_cls=part), run.words, seed=0)
            report = {name: {"test_accuracy": found[name]["test_accuracy"]} for name in ("naive_bayes", "tfidf_logreg")}
        else:
            settings = training.training_config(sliced, "classifier", preset=job.model)
            steps_per_epoch = math.ceil(len(segments.texts) * (1 - VALIDATION) / settings.batch_size)
            epochs = max(2, min(settings.epochs, math.ceil(job.steps / steps_per_epoch)))
            settings = replace(settings, epochs=epochs, validation_fraction=VALIDATION, refit=False)
            config = training.model_config(sliced, "classifier", preset=job.model)
            result = training.train_classifier(sliced, config, settings, job.seed, log=quiet)
            report = {"test_accuracy": result.final["test_accuracy"], "epochs": epochs, "best_epoch": result.chosen}
        report["train_segments"] = len(held_out(segments)[0].texts)
    report["seconds"] = time.perf_counter() - started
    return job, report


def scaling_settings(settings: training.RunSettings) -> training.RunSettings:
    """The command's settings, with the data switched to sotu-all (whatever data the rest of the command reads)."""
    return replace(settings, data_dir=None, corpus="sotu-all", tokenizer="word")


def jobs_for(seed: int, full: bool, lm_steps: int, cls_steps: int) -> list[SliceJob]:
    """Every (task, model, size) of the study; the biggest first, so that two workers finish together."""
    lm_sizes, cls_sizes = (LM_TOKENS_FULL, CLS_SEGMENTS_FULL) if full else (LM_TOKENS, CLS_SEGMENTS)
    jobs = [SliceJob("lm", model, size, seed, lm_steps) for size in lm_sizes for model in (*TRANSFORMERS, "kneser_ney")]
    jobs += [SliceJob("classifier", model, size, seed, cls_steps) for size in cls_sizes
             for model in (*TRANSFORMERS, "count_classifiers")]
    return sorted(jobs, key=lambda job: (job.model in ("kneser_ney", "count_classifiers"), -(job.size or 10**9)))


def study(run: training.Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """Run every job on the context's workers; return the curves, the crossovers and the timing (no attention checks)."""
    started = time.perf_counter()
    options = context.options
    lm_steps, cls_steps = options["scaling_lm_steps"], options["scaling_cls_steps"]
    jobs = jobs_for(context.seed, options["scaling_full"], lm_steps, cls_steps)
    log(f"scaling: {len(jobs)} runs on sotu-all slices on {context.workers} workers")
    settings = scaling_settings(run.settings)
    # built here once, not by each worker at the same time
    corpus.locate(settings.data_dir, settings.corpus, settings.cache_dir, log)
    done = map_jobs(settings, jobs, context.workers, _train_slice)
    lm, classifier = {}, {}
    for job, report in done:
        table = lm if job.task == "lm" else classifier
        if job.model == "count_classifiers":
            for name in ("naive_bayes", "tfidf_logreg"):
                table.setdefault(name, {})[job.size] = {**report[name], "train_segments": report["train_segments"]}
        else:
            table.setdefault(job.model, {})[job.size] = report
        log(f"  {job.task:10s} {job.model:17s} {job.size or 'all'!s:>9}: {describe(job, report)} ({report['seconds']:.0f} s)")
    results = {"lm": {model: [row for _, row in sorted(rows.items(), key=lambda kv: kv[0] or 10**12)]
                      for model, rows in lm.items()},
               "classifier": {model: [row for _, row in sorted(rows.items(), key=lambda kv: kv[0] or 10**12)]
                              for model, rows in classifier.items()},
               "lm_steps": lm_steps, "classifier_steps": cls_steps, "seed": context.seed}
    results["crossover"] = crossovers(results)
    results["seconds"] = time.perf_counter() - started
    return results, []


def describe(job: SliceJob, report: dict) -> str:
    """One job's test figure, for the progress log."""
    if job.task == "lm":
        return f"pooled ppl {report['pooled_perplexity']:.1f}"
    if job.model == "count_classifiers":
        return " / ".join(f"{name} {report[name]['test_accuracy']:.2f}%" for name in ("naive_bayes", "tfidf_logreg"))
    return f"test acc {report['test_accuracy']:.2f}%"


def crossovers(results: dict) -> dict:
    """Per transformer: the smallest slice where it beats each count model (None: never within the range)."""
    found = {}
    for task, size_key, value_key, better, rivals in (
            ("lm", "train_tokens", "pooled_perplexity", lambda a, b: a < b, ("kneser_ney",)),
            ("classifier", "train_segments", "test_accuracy", lambda a, b: a > b, ("naive_bayes", "tfidf_logreg"))):
        for model in TRANSFORMERS:
            for rival in rivals:
                rows = zip(results[task][model], results[task][rival])
                first = next((mine[size_key] for mine, theirs in rows if better(mine[value_key], theirs[value_key])), None)
                found[f"{task} {model} vs {rival}"] = first
    return found


def tables(results: dict) -> dict[str, str]:
    """Markdown: test perplexity (per file and pooled) and test accuracy against the training size."""
    rows = []
    for model, points in results["lm"].items():
        for row in points:
            rows.append([model, f"{row['train_tokens']:,}", *(f"{row['perplexity'][n]:.1f}" for n in row["perplexity"]),
                         f"{row['pooled_perplexity']:.1f}"])
    lm = utilities.markdown_table(["language model", "training tokens", "obama", "wbush", "hbush", "pooled"], rows)
    rows = [[model, f"{row['train_segments']:,}", f"{row['test_accuracy']:.2f}"]
            for model, points in results["classifier"].items() for row in points]
    classifier = utilities.markdown_table(["classifier", "training segments", "test acc % (17 presidents)"], rows)
    crossover = utilities.markdown_table(["transformer vs count model", "first training size where it wins"],
                                         [[name, f"{size:,}" if size else "never in this range"]
                                          for name, size in results["crossover"].items()])
    return {"lm": lm, "classifier": classifier, "crossover": crossover}


def plot(results: dict, out: Path):
    """Log-log test perplexity, and log-x test accuracy, against the training size; one line per model."""
    series = {model: ([row["train_tokens"] for row in points], [row["pooled_perplexity"] for row in points])
              for model, points in results["lm"].items()}
    utilities.plot_curves(series, "training tokens", "test perplexity (three held-out addresses, pooled)",
                          "Data scaling: language models", out / "scaling_lm.png", log_y=True, log_x=True)
    series = {model: ([row["train_segments"] for row in points], [row["test_accuracy"] for row in points])
              for model, points in results["classifier"].items()}
    utilities.plot_curves(series, "labelled training segments", "test accuracy (%, 17 presidents)",
                          "Data scaling: classifiers", out / "scaling_classifier.png", log_x=True)


STUDY = Study("scaling", "scaling", "data scaling (sotu-all)",
              "also train the transformers and count models on growing slices of sotu-all (studies/scaling.py)",
              study, lambda results: {f"scaling_{name}": table for name, table in tables(results).items()}, plot,
              options=(Option("scaling_full", bool, False,
                              "with --scaling: add the 512k, 1M and whole-corpus slices (and 8k, 16k, all segments)"),
                       Option("scaling_lm_steps", int, 1500, "with --scaling: decoder iterations per slice", minimum=1),
                       Option("scaling_cls_steps", int, 1500,
                              "with --scaling: encoder steps per slice (at least 2 epochs, at most the preset's)",
                              minimum=1)))
