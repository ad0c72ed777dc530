"""The worker pool of part three's studies: one training run per job, on as many processes as there are cores.

Every run goes through training.py's shared train/evaluate functions, so a variant differs from the base model only
in its config. Each worker rebuilds the command's Run from its RunSettings once, and trains on one thread.
"""

import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

import training
import utilities
from runtime.memory import keep_freed_memory
from studies import gap

_WORKER = {}


def _init_alone(threads: int):
    """A spawned process's settings: `threads` threads, and main.py's malloc setting (not inherited by a spawn)."""
    torch.set_num_threads(threads)
    keep_freed_memory()


def _init_worker(settings: training.RunSettings):
    """Each worker reads the data once and trains on one thread, so two workers fill two cores."""
    _init_alone(1)
    _WORKER["run"] = training.build_run(settings, log=lambda *a: None)  # the parent process has said which data


@dataclass
class Job:
    """One training run: a task, a named set of config changes on top of a preset, a seed."""

    task: str  # classifier | lm
    name: str
    seed: int
    changes: dict = field(default_factory=dict)
    preset: str = "base"
    heatmap: bool = False
    extrapolate: tuple[int, ...] = ()  # also the perplexity at these evaluation contexts
    gap: bool = False


def _train_one(job: Job) -> tuple[Job, dict]:
    """Train one job in a worker; return its report (final figures, test probabilities, check failures)."""
    run = worker_run()
    config = training.model_config(run, job.task, preset=job.preset, **job.changes)
    settings = training.training_config(run, job.task, preset=job.preset)
    quiet = lambda *a, **k: None  # noqa: E731
    prefix = f"{job.preset}_{'encoder' if job.task == 'classifier' else 'decoder'}_{job.name}"
    if job.task == "classifier":
        result = training.train_classifier(run, config, settings, job.seed, log=quiet)
        model, report = result.model, job_report(result)
        ids, _ = training.classifier_tensors(run, run.data.test_cls, config.block_size)
        report["probabilities"] = training.predict(model, ids, run.device).tolist()  # for seed ensembles
        report["attention_failures"] = utilities.attention_check(
            model, run.tokenizer, run.data.test_cls.texts[0], False, run.device, run.heatmap_dir if job.heatmap else None, prefix)
        return job, report
    if settings.validation_fraction == 0:  # nothing to select on: evaluate once, at the end
        settings = replace(settings, eval_interval=settings.max_iters)
    result = training.train_language_model(run, config, settings, job.seed, log=quiet)
    model, report = result.model, job_report(result)
    report["attention_failures"] = utilities.attention_check(
        model, run.tokenizer, run.data.test_lm["obama"], True, run.device, run.heatmap_dir if job.heatmap else None, prefix)
    if job.gap:  # per-target NLLs, for the gap to Kneser-Ney by word frequency (studies/gap.py)
        report["target_nlls"] = {name: gap.target_nlls(model, training.encode_stream(run, text), config.block_size,
                                                       run.device).tolist() for name, text in run.data.test_lm.items()}
    if job.extrapolate:
        report["extrapolation"] = {
            length: {name: training.perplexity(model, training.encode_stream(run, text), length, run.device)
                     for name, text in run.data.test_lm.items()} for length in job.extrapolate}
    return job, report


def job_report(result: training.TrainResult) -> dict:
    """A job's figures for the summaries: the returned model's (the refit under --preset best), its size and seconds,
    the epoch or iteration validation chose, and the rows that chose it (the selection run's, where there is one)."""
    return {**result.final, "num_parameters": result.num_parameters, "train_seconds": result.train_seconds,
            "chosen": result.chosen, "curve": result.selection or result.history}


@contextmanager
def in_this_process(settings: training.RunSettings):
    """A stand-in for the pool when there is one worker: the jobs run here, on one thread as a worker's do
    (so the numbers are the pool's), and the thread count and worker state are put back after."""
    threads = torch.get_num_threads()
    _init_worker(settings)
    try:
        yield
    finally:
        _WORKER.clear()
        torch.set_num_threads(threads)


def in_a_fresh_process(function, *args):
    """function(*args), called in a process spawned for it alone, on this process's thread count; its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, context, initializer=_init_alone, initargs=(torch.get_num_threads(),)) as pool:
        return pool.submit(function, *args).result()


def worker_run() -> training.Run:
    """The Run a worker process built once from the command's options."""
    return _WORKER["run"]


def map_jobs(settings: training.RunSettings, jobs: list, workers: int, work):
    """Yield work(job) -> (job, report) for every job, in order, on `workers` processes (one: in this process)."""
    if workers == 1:
        with in_this_process(settings):
            yield from map(work, jobs)
        return
    # spawn, not fork: forking a process that already runs torch's thread pool can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.map(work, jobs)


def run_jobs(settings: training.RunSettings, jobs: list[Job], workers: int, log=print) -> tuple[dict, list[str]]:
    """Run jobs on `workers` processes (one: in this process); return {(task, name): [report per seed]} and the
    check failures."""
    runs, failures = {}, []
    for job, report in map_jobs(settings, jobs, workers, _train_one):
        failures += [f"seed {job.seed}: {failure}" for failure in report.pop("attention_failures")]
        runs.setdefault((job.task, job.name), []).append(report)
        log(f"  {job.task:10s} {job.name:16s} seed {job.seed}: " + (
            f"test acc {report['test_accuracy']:.2f}%" if job.task == "classifier"
            else "ppl " + " / ".join(f"{v:.1f}" for v in report["perplexity"].values())))
    return runs, failures


def worker_count(requested: int | None) -> int:
    """Worker processes: one per core by default."""
    return requested or max(1, min(2, os.cpu_count() or 1))


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def cell(spread: dict) -> str:
    """A spread as "mean ± std"."""
    return f"{spread['mean']:.2f} ± {spread['std']:.2f}"
