"""Part three's data-scaling study: the transformers against the count models on growing slices of sotu-all.

The language models learn from nested slices of sotu-all's training text (its lines shuffled once, then the first N
word tokens): the course base decoder at its fixed budget (a reference line: the same model, more data); the grown
decoder, whose size, context and training length are chosen for each slice (the model and its compute grown with
the data: GROWN_FAMILY, budget_steps); the Kneser–Ney trigram and an interpolated modified Kneser–Ney 5-gram. The
classifiers (the base and best encoders, naive Bayes, TF-IDF logistic regression) learn from nested slices of its
labelled segments. Every slice keeps its last 10% as the validation split that makes every choice (the grown
decoder's family member and stopping point, the encoders' epoch, the baselines' smoothing); every model of a slice
learns from the same other 90%, and every point is scored on the same test files: the three course presidents'
held-out addresses (test_LM_*.txt) and the 17-president test_CLS.tsv. The vocabulary (sotu-all's 10,000 most
frequent words) is the same at every size. Power laws L(D) = a D^-alpha + c are fitted to each language model's
points (L: the pooled test loss in nats); what they say past the measured range is a prediction.
"""

import hashlib
import json
import math
import random
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path

import torch

import training
import utilities
from dataset import TEST_LM, LabelledSegments, split_lines, stratified_split
from runtime import corpus
from studies import baselines
from studies.study import Context, Option, Study
from studies.workers import map_jobs, worker_run

LM_TOKENS = (32_000, 64_000, 128_000, 256_000, 512_000)  # the default run; --scaling-full adds 1M and all
LM_TOKENS_FULL = (*LM_TOKENS, 1_000_000, None)  # None: the whole training text
CLS_SEGMENTS = (500, 1_000, 2_000, 4_000)
CLS_SEGMENTS_FULL = (*CLS_SEGMENTS, 8_000, 16_000, None)
VALIDATION = 0.1
EVALUATIONS = 5  # the fixed-budget decoders' validation evaluations per run: the best one is kept
ENCODERS = ("base", "best")
DECODERS = ("base", "grown")
COUNT_MODELS = ("kneser_ney", "kneser_ney_5")
SHUFFLE_SEED = 0

# the grown decoder's family: changes to the best preset's decoder (GELU, tied embeddings, init 0.02); each slice
# trains the members that candidates_for names and keeps the one with the best validation perplexity
GROWN_FAMILY = {
    "w64-l2-c64": {"n_embd": 64, "n_head": 4, "n_layer": 2, "block_size": 64, "ff_hidden": 256, "dropout": 0.2},
    "w128-l4-c128": {"n_embd": 128, "n_head": 4, "n_layer": 4, "block_size": 128, "ff_hidden": 512, "dropout": 0.2},
    "w256-l4-c128": {"n_embd": 256, "n_head": 4, "n_layer": 4, "block_size": 128, "ff_hidden": 1024, "dropout": 0.1},
}
# how every member computes: the manual attention (in bf16 on the CPU, faster than torch's fused one) and the chunked
# loss, which never holds the (B, T, 10,000) logits (1.89x the course's loss in bf16 here: bench/scaling_throughput.py)
GROWN_MODEL = {"attention": "manual", "lm_loss": "chunked"}
# the course base decoder keeps its model and fp32; only its loss is computed in row blocks (the same function)
BASE_MODEL = {"lm_loss": "chunked"}
# AdamW with warm-up and cosine decay, weight decay, bf16 autocast (evaluation stays fp32)
GROWN_TRAINING = {"batch_size": 32, "weight_decay": 0.1, "warmup_steps": 100, "cosine_decay": True}
GROWN_LEARNING_RATES = {64: 2e-3, 128: 2e-3, 256: 1e-3}  # by width
GROWN_PRECISION = "bf16"
PASSES_SMALLEST, PASSES_FEWEST, MIN_STEPS = 20, 4, 400  # the token budget: 20 passes at 32k words, down to 4
EVALUATIONS_GROWN, PATIENCE = 12, 3  # evaluations planned per run; stop after 3 without a better validation
# the default run's slices try w64 and w128; w256 only from 1M words on: on the 512k slice it lost to w128 on validation
# (179.1 against 164.5) and cost 1.8x its time (docs/scaling.md)
SMALLER_MEMBERS_UP_TO = 512_000
GROWN_ENCODER, CLS_PATIENCE = "best", 5  # the encoder grown with the data: every epoch of its preset, patience 5 epochs


def candidates_for(size: int | None) -> tuple[str, ...]:
    """The family members a slice tries: the two smaller up to SMALLER_MEMBERS_UP_TO words, the two larger above."""
    return tuple(GROWN_FAMILY)[:2] if size is not None and size <= SMALLER_MEMBERS_UP_TO else tuple(GROWN_FAMILY)[1:]


def budget_steps(train_tokens: int, block_size: int, batch_size: int) -> int:
    """Updates for a slice: PASSES_SMALLEST passes over 32k words, falling as 1/sqrt(D) to PASSES_FEWEST, and never
    fewer than MIN_STEPS (the number of updates binds as well as the tokens seen)."""
    passes = min(PASSES_SMALLEST, max(PASSES_FEWEST, PASSES_SMALLEST * math.sqrt(32_000 / train_tokens)))
    return max(MIN_STEPS, math.ceil(passes * train_tokens / (batch_size * block_size)))


@dataclass(frozen=True)
class SliceJob:
    """One model trained on one slice: task lm | classifier; model base | best | grown | kneser_ney | kneser_ney_5 |
    count_classifiers; for the grown decoder, the family member."""

    task: str
    model: str
    size: int | None
    seed: int
    steps: int
    member: str | None = None


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


def fit_power_law(sizes: list[float], losses: list[float]) -> dict:
    """L(D) = a D^-alpha + c fitted to (D, L) points by least squares in L, with c >= 0 (a loss has no negative
    floor): for each c on a grid below the smallest loss, log(L - c) is linear in log D (a and alpha in closed form);
    the best c's fit is then polished by Gauss-Newton steps on all three, c held at 0 or above. Returns a, alpha, c,
    the residuals (L minus the fit) and their root mean square."""
    x = torch.tensor([math.log(size) for size in sizes], dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64)
    if len(x) < 3:
        raise ValueError(f"a power law with an irreducible term needs at least 3 points, got {len(x)}")

    def log_linear(c):  # (log a, alpha) of the straight line through (log D, log(L - c))
        design = torch.stack([torch.ones_like(x), -x], dim=1)
        solution = torch.linalg.lstsq(design, torch.log(y - c).unsqueeze(1)).solution.squeeze(1)
        return solution[0], solution[1]

    def residuals(parameters):
        log_a, alpha, c = parameters
        return y - (torch.exp(log_a - alpha * x) + c)

    grid = torch.linspace(0.0, float(y.min()) * (1 - 1e-6), 2001, dtype=torch.float64)
    fits = [(float((residuals(torch.stack([*log_linear(c), c])) ** 2).sum()), c) for c in grid]
    parameters = torch.stack([*log_linear(min(fits)[1]), min(fits)[1]])
    for _ in range(50):  # Gauss-Newton, with step halving so that the squared error never grows
        jacobian = torch.autograd.functional.jacobian(residuals, parameters)  # (points, 3)
        step = torch.linalg.lstsq(jacobian, -residuals(parameters).unsqueeze(1)).solution.squeeze(1)
        def projected(scale, start=parameters, step=step):  # a step from `start`, with c kept at 0 or above
            moved = start + scale * step
            return torch.stack([moved[0], moved[1], moved[2].clamp_min(0.0)])

        before, scale = float((residuals(parameters) ** 2).sum()), 1.0
        while scale > 1e-6 and float((residuals(projected(scale)) ** 2).sum()) > before:
            scale /= 2
        if scale <= 1e-6:
            break
        parameters = projected(scale)
    left = residuals(parameters)
    log_a, alpha, c = (float(value) for value in parameters)
    return {"a": math.exp(log_a), "alpha": alpha, "c": c, "residuals": left.tolist(),
            "rms_residual": float(left.pow(2).mean().sqrt())}


def power_law(fit: dict, size: float) -> float:
    """The fitted L at training size `size` (a prediction outside the measured range)."""
    return fit["a"] * size ** -fit["alpha"] + fit["c"]


def _train_slice(job: SliceJob) -> tuple[SliceJob, dict]:
    """Train (or count) one model on one slice in a worker; return its test figures."""
    run = worker_run()
    quiet = lambda *a, **k: None  # noqa: E731
    started = time.perf_counter()
    if job.task == "lm":
        text = lm_slice(run.data.train_lm, run.words, job.size)
        sliced = replace(run, data=replace(run.data, train_lm=text))
        if job.model in COUNT_MODELS:  # the same 90% the decoders learn from
            train = run.words.encode(split_lines(text, VALIDATION)[0])
            model = (baselines.KneserNeyTrigram(train, run.words.vocab_size) if job.model == "kneser_ney"
                     else baselines.ModifiedKneserNey(train, run.words.vocab_size, order=5))
            report = {"perplexity": {name: model.perplexity(run.words.encode(t)) for name, t in run.data.test_lm.items()}}
        elif job.model == "grown":
            report = train_grown(sliced, job, quiet)
        else:
            config = training.model_config(sliced, "lm", preset=job.model, **BASE_MODEL)
            settings = replace(training.training_config(sliced, "lm", preset=job.model), max_iters=job.steps,
                               eval_interval=max(1, job.steps // EVALUATIONS), validation_fraction=VALIDATION,
                               refit=False)
            result = training.train_language_model(sliced, config, settings, job.seed, log=quiet, train_eval_tokens=20_000,
                                                   curves=False)
            report = {"perplexity": result.final["perplexity"], "best_iteration": result.chosen,
                      "num_parameters": result.num_parameters}
        report["train_tokens"] = train_words(sliced)
        report["targets"] = training.scored_words(run)
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
            # the base encoder: at most --scaling-cls-steps (the reference line); the best one grown with the data:
            # its preset's epochs at every size, so its updates grow with the slice, until validation stops improving
            grown = job.model == GROWN_ENCODER
            epochs = settings.epochs if grown else max(2, min(settings.epochs, math.ceil(job.steps / steps_per_epoch)))
            settings = replace(settings, epochs=epochs, validation_fraction=VALIDATION, refit=False)
            config = training.model_config(sliced, "classifier", preset=job.model)
            result = training.train_classifier(sliced, config, settings, job.seed, log=quiet,
                                               patience=CLS_PATIENCE if grown else None)
            report = {"test_accuracy": result.final["test_accuracy"], "epochs": epochs, "best_epoch": result.chosen,
                      "epochs_run": result.history[-1]["epoch"]}
        report["train_segments"] = len(held_out(segments)[0].texts)
    report["seconds"] = time.perf_counter() - started
    return job, report


def train_words(run: training.Run) -> int:
    """Word tokens of the slice's training 90%: what every model of the slice learns from."""
    return len(run.words.split(split_lines(run.data.train_lm, VALIDATION)[0]))


def train_grown(run: training.Run, job: SliceJob, log) -> dict:
    """One family member on one slice, to its token budget or until validation stops improving."""
    changes = GROWN_FAMILY[job.member]
    config = training.model_config(run, "lm", preset="best", **changes, **GROWN_MODEL)
    train_tokens = train_words(run)
    steps = budget_steps(train_tokens, config.block_size, GROWN_TRAINING["batch_size"])
    settings = replace(training.training_config(run, "lm", preset="best"), **GROWN_TRAINING, max_iters=steps,
                       learning_rate=GROWN_LEARNING_RATES[config.n_embd], eval_interval=max(1, steps // EVALUATIONS_GROWN),
                       validation_fraction=VALIDATION, refit=False, precision=GROWN_PRECISION)
    # only validation along the way (what the choice reads); the test files once, on the restored best model
    result = training.train_language_model(run, config, settings.validate(), job.seed, log=log, train_eval_tokens=20_000,
                                           patience=PATIENCE, curves=False)
    taken = result.history[-1]["iteration"]
    return {"perplexity": result.final["perplexity"], "validation_perplexity": result.final["validation_perplexity"],
            "best_iteration": result.chosen, "iterations": taken, "planned_iterations": steps,
            "tokens_seen": taken * settings.batch_size * config.block_size, "num_parameters": result.num_parameters,
            "settings": {**changes, **GROWN_MODEL, "learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
                         "precision": settings.precision}}


def scaling_settings(settings: training.RunSettings) -> training.RunSettings:
    """The command's settings, with the data switched to sotu-all (whatever data the rest of the command reads)."""
    return replace(settings, data_dir=None, corpus="sotu-all", tokenizer="word")


def jobs_for(seed: int, full: bool, lm_steps: int, cls_steps: int) -> list[SliceJob]:
    """Every (task, model, size) of the study; the biggest first, so that two workers finish together."""
    lm_sizes, cls_sizes = (LM_TOKENS_FULL, CLS_SEGMENTS_FULL) if full else (LM_TOKENS, CLS_SEGMENTS)
    # a count model's job has no steps (0), so a changed --scaling-lm-steps keeps its points
    jobs = [SliceJob("lm", model, size, seed, lm_steps if model == "base" else 0) for size in lm_sizes
            for model in ("base", *COUNT_MODELS)]
    jobs += [SliceJob("lm", "grown", size, seed, 0, member) for size in lm_sizes for member in candidates_for(size)]
    jobs += [SliceJob("classifier", model, size, seed, cls_steps if model == "base" else 0) for size in cls_sizes
             for model in (*ENCODERS, "count_classifiers")]
    # the longest first (the grown decoders, the largest slices), so that two workers finish together
    return sorted(jobs, key=lambda job: (job.model != "grown", job.model in (*COUNT_MODELS, "count_classifiers"),
                                         -(job.size or 10**9)))


def job_file(folder: Path, job: SliceJob, settings: training.RunSettings) -> Path:
    """Where a finished point is kept: its name says the job, its digest what decides its figures (the job, the
    study's constants, the presets, and the command's model and training flags, which the decoders and encoders
    read); the code itself is not in it, so a changed study wants a fresh --out."""
    decides = json.dumps([asdict(job), BASE_MODEL, GROWN_FAMILY, GROWN_MODEL, GROWN_TRAINING, GROWN_LEARNING_RATES,
                          GROWN_PRECISION, PASSES_SMALLEST, PASSES_FEWEST, MIN_STEPS, EVALUATIONS_GROWN, PATIENCE, EVALUATIONS,
                          GROWN_ENCODER, CLS_PATIENCE, VALIDATION, SHUFFLE_SEED,
                          {name: asdict(preset) for name, preset in training.PRESETS.items()},
                          settings.model_flags, settings.training_flags, settings.precision, settings.compile],
                         sort_keys=True, default=str)
    name = f"{job.task}_{job.model}{'_' + job.member if job.member else ''}_{job.size or 'all'}"
    return folder / f"{name}_{hashlib.sha256(decides.encode()).hexdigest()[:12]}.json"


def finished_points(settings: training.RunSettings, jobs: list[SliceJob], workers: int, folder: Path, log):
    """Yield (job, report) for every job: those kept in `folder` by an earlier run first, then the others as they
    finish, each written there at once; a worker that dies stops the study with one line naming its point."""
    kept, todo = [], []
    for job in jobs:
        path = job_file(folder, job, settings)
        try:
            kept.append((job, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):  # not there, or cut short: trained again
            todo.append(job)
    if kept:
        log(f"scaling: {len(kept)} points kept from an earlier run in {folder}")
    yield from kept
    done = map_jobs(settings, todo, workers, _train_slice)
    for index in range(len(todo)):
        try:
            job, report = next(done)
        except (BrokenProcessPool, ArithmeticError, ValueError, RuntimeError) as error:
            job = todo[index]
            why = "its worker died (out of memory, or killed)" if isinstance(error, BrokenProcessPool) else str(error)
            point = " ".join(str(part) for part in (job.task, job.model, job.member, job.size or "all") if part)
            raise ValueError(f"scaling: {point}: {why}; the {index + len(kept)} finished points are kept in {folder}, "
                             "and a rerun skips them") from None
        utilities.write_json(job_file(folder, job, settings), report)
        yield job, report


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
    lm, classifier, members = {}, {}, {}
    for job, report in finished_points(settings, jobs, context.workers, run.out / "scaling_points", log):
        table = lm if job.task == "lm" else classifier
        if job.model == "count_classifiers":
            for name in ("naive_bayes", "tfidf_logreg"):
                table.setdefault(name, {})[job.size] = {**report[name], "train_segments": report["train_segments"]}
        elif job.model == "grown":
            members.setdefault(job.size, {})[job.member] = report
        else:
            table.setdefault(job.model, {})[job.size] = report
        log(f"  {job.task:10s} {job.model:12s} {job.member or '':13s} {job.size or 'all'!s:>9}: {describe(job, report)} "
            f"({report['seconds']:.0f} s)")
    lm["grown"] = {size: choose_member(candidates) for size, candidates in members.items()}
    results = {"lm": {model: [row for _, row in sorted(rows.items(), key=lambda kv: kv[0] or 10**12)]
                      for model, rows in lm.items()},
               "classifier": {model: [row for _, row in sorted(rows.items(), key=lambda kv: kv[0] or 10**12)]
                              for model, rows in classifier.items()},
               "lm_steps": lm_steps, "classifier_steps": cls_steps, "seed": context.seed}
    results["crossover"] = crossovers(results)
    results["crossover_interpolated"] = interpolated_crossovers(results["lm"])
    results["fits"] = fits(results["lm"])
    results["seconds"] = time.perf_counter() - started
    return results, []


def choose_member(candidates: dict[str, dict]) -> dict:
    """The family member with the best validation perplexity (never a test figure), and what every member scored."""
    name = min(candidates, key=lambda member: candidates[member]["validation_perplexity"])
    return {**candidates[name], "member": name, "seconds": sum(c["seconds"] for c in candidates.values()),
            "candidates": {member: {"validation_perplexity": c["validation_perplexity"], "iterations": c["iterations"],
                                    "seconds": c["seconds"]} for member, c in candidates.items()}}


def interpolated_crossovers(lm: dict) -> dict:
    """Per decoder and count model: the training size where the log-log curves cross (the log ratio of their pooled
    perplexities interpolated linearly in log size between the last point above and the first below), else None."""
    found = {}
    for model in DECODERS:
        for rival in COUNT_MODELS:
            found[f"lm {model} vs {rival}"] = None
            points = [(math.log(mine["train_tokens"]), math.log(mine["pooled_perplexity"] / theirs["pooled_perplexity"]))
                      for mine, theirs in zip(lm.get(model, []), lm.get(rival, []))]
            for (x0, gap0), (x1, gap1) in pairwise(points):
                if gap0 >= 0 > gap1:
                    found[f"lm {model} vs {rival}"] = round(math.exp(x0 + (x1 - x0) * gap0 / (gap0 - gap1)))
                    break
            if points and points[0][1] < 0:
                found[f"lm {model} vs {rival}"] = "below from the first point"
    return found


PREDICT_AT = (1_789_361, 10_000_000)  # the word tokens of sotu-all's whole training 90% (--scaling-full), and ten million


def fits(lm: dict) -> dict:
    """L(D) = a D^-alpha + c per language model (L: pooled test loss in nats, D: training tokens), and what each fit
    predicts at PREDICT_AT; none for a model with fewer than 3 points."""
    found = {}
    for model, points in lm.items():
        if len(points) >= 3:
            fit = fit_power_law([p["train_tokens"] for p in points], [math.log(p["pooled_perplexity"]) for p in points])
            fit["predicted_pooled_perplexity"] = {str(size): math.exp(power_law(fit, size)) for size in PREDICT_AT}
            found[model] = fit
    return found


def describe(job: SliceJob, report: dict) -> str:
    """One job's test figure, for the progress log."""
    if job.task == "lm":
        return f"pooled ppl {report['pooled_perplexity']:.1f}" + (
            f", validation {report['validation_perplexity']:.1f}" if job.model == "grown" else "")
    if job.model == "count_classifiers":
        return " / ".join(f"{name} {report[name]['test_accuracy']:.2f}%" for name in ("naive_bayes", "tfidf_logreg"))
    return f"test acc {report['test_accuracy']:.2f}%"


def crossovers(results: dict) -> dict:
    """Per transformer: the smallest slice where it beats each count model (None: never within the range)."""
    found = {}
    for task, size_key, value_key, better, models, rivals in (
            ("lm", "train_tokens", "pooled_perplexity", lambda a, b: a < b, DECODERS, COUNT_MODELS),
            ("classifier", "train_segments", "test_accuracy", lambda a, b: a > b, ENCODERS, ("naive_bayes", "tfidf_logreg"))):
        for model in models:
            for rival in rivals:
                rows = zip(results[task].get(model, []), results[task].get(rival, []))
                first = next((mine[size_key] for mine, theirs in rows if better(mine[value_key], theirs[value_key])), None)
                found[f"{task} {model} vs {rival}"] = first
    return found


def tables(results: dict) -> dict[str, str]:
    """Markdown: test perplexity (per file and pooled) and test accuracy against the training size, the crossovers,
    the power-law fits and what they predict."""
    rows = []
    for model, points in results["lm"].items():
        for row in points:
            chosen = f"{row['member']}, {row['iterations']:,} of {row['planned_iterations']:,} it." if "member" in row else ""
            rows.append([model, f"{row['train_tokens']:,}", *(f"{row['perplexity'][n]:.1f}" for n in row["perplexity"]),
                         f"{row['pooled_perplexity']:.1f}", chosen, f"{row['seconds']:.0f}"])
    lm = utilities.markdown_table(["language model", "training tokens", *TEST_LM, "pooled",
                                   "validation chose", "seconds"], rows)
    rows = [[model, f"{row['train_segments']:,}", f"{row['test_accuracy']:.2f}"]
            for model, points in results["classifier"].items() for row in points]
    classifier = utilities.markdown_table(["classifier", "training segments", "test acc % (17 presidents)"], rows)
    interpolated = results.get("crossover_interpolated", {})

    def size(value):
        return f"{value:,}" if isinstance(value, int) else value or "never in this range"
    crossover = utilities.markdown_table(
        ["transformer vs count model", "first training size where it wins", "where the log-log curves cross"],
        [[name, size(first), size(interpolated[name]) if name in interpolated else ""]
         for name, first in results["crossover"].items()])
    rows = [[model, f"{fit['a']:.4g}", f"{fit['alpha']:.4f}", f"{fit['c']:.4f} ({math.exp(fit['c']):.1f})",
             f"{fit['rms_residual']:.4f}", *(f"{value:.1f}" for value in fit["predicted_pooled_perplexity"].values())]
            for model, fit in results.get("fits", {}).items()]
    fitted = utilities.markdown_table(["language model", "a", "alpha", "c, nats (perplexity)", "rms residual, nats",
                                       *(f"predicted pooled ppl at {int(s):,} tokens" for s in PREDICT_AT)], rows)
    return {"lm": lm, "classifier": classifier, "crossover": crossover, "fits": fitted}


def plot(results: dict, out: Path):
    """Log-log test perplexity against the training size, one line per model, each fit dashed past the points and
    the crossovers marked; and log-x test accuracy of the classifiers."""
    figure, axes = utilities.pyplot().subplots(figsize=(7, 4.5))
    for model, points in results["lm"].items():
        sizes = [row["train_tokens"] for row in points]
        line, = axes.plot(sizes, [row["pooled_perplexity"] for row in points], marker="o", markersize=3, label=model)
        fit = results.get("fits", {}).get(model)
        if fit is not None:
            grid = [sizes[0] * (PREDICT_AT[-1] / sizes[0]) ** (i / 60) for i in range(61)]
            axes.plot(grid, [math.exp(power_law(fit, d)) for d in grid], linestyle="--", linewidth=0.8,
                      color=line.get_color())
    for name, where in results.get("crossover_interpolated", {}).items():
        if isinstance(where, int):
            axes.axvline(where, color="grey", linestyle=":", linewidth=0.8)
            axes.annotate(name.removeprefix("lm "), (where, axes.get_ylim()[1]), rotation=90, fontsize=7, va="top")
    utilities.save_log_log(figure, axes, "training tokens", "test perplexity (three held-out addresses, pooled)",
                           "Data scaling: language models (dashed: power-law fits)", out / "scaling_lm.png")
    series = {model: ([row["train_segments"] for row in points], [row["test_accuracy"] for row in points])
              for model, points in results["classifier"].items()}
    utilities.plot_curves(series, "labelled training segments", "test accuracy (%, 17 presidents)",
                          "Data scaling: classifiers", out / "scaling_classifier.png", log_x=True)

STUDY = Study("scaling", "scaling", "data scaling (sotu-all)",
              "also train the transformers and count models on growing slices of sotu-all (studies/scaling.py)",
              study, lambda results: {f"scaling_{name}": table for name, table in tables(results).items()}, plot,
              options=(Option("scaling_full", bool, False,
                              "with --scaling: add the 1M and whole-corpus slices (and 8k, 16k, all segments)"),
                       Option("scaling_lm_steps", int, 1500, "with --scaling: decoder iterations per slice", minimum=1),
                       Option("scaling_cls_steps", int, 1500,
                              "with --scaling: encoder steps per slice (at least 2 epochs, at most the preset's)",
                              minimum=1)))
