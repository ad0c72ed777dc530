"""Part three's studies: the worker pool gives the numbers training in-process gives, and the seed ensemble
against hand-computed accuracies."""

from types import SimpleNamespace

import pytest
import torch

import training
from studies import improvement, workers
from studies.workers import Job


def test_the_pool_and_one_process_train_the_same_models(small_data):
    """The only test that starts worker processes: the others run their jobs in-process (--workers 1)."""
    settings = training.RunSettings(data_dir=small_data, device="cpu", plots=False,
                                    training_flags={"epochs": 1, "max_iters": 10, "eval_interval": 10},
                                    model_flags={"n_layer": 1, "n_embd": 16, "block_size": 16})
    jobs = [Job("classifier", "base", 3), Job("lm", "alibi", 3, {"position": "alibi"})]
    threads = torch.get_num_threads()
    pooled, pooled_failures = workers.run_jobs(settings, jobs, 2, log=lambda *a: None)
    here, here_failures = workers.run_jobs(settings, jobs, 1, log=lambda *a: None)
    assert torch.get_num_threads() == threads and not workers._WORKER  # the in-process run leaves nothing behind

    def figures(runs):
        return {key: [{k: v for k, v in report.items() if "seconds" not in k} for report in reports]
                for key, reports in runs.items()}

    assert figures(pooled) == figures(here) and pooled_failures == here_failures == []
    assert set(pooled) == {("classifier", "base"), ("lm", "alibi")}


def test_seed_ensemble_averages_the_probabilities(tiny_speeches):
    # test labels 0, 2, 1, 0, 0; rows 0, 1, 4 seen in train_CLS, row 3 in neither training file
    first = [[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.4, 0.5, 0.1]]
    second = [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.9, 0.05, 0.05]]
    # the first seed predicts 0 1 1 2 1 (2 of 5 right), the second 1 2 1 0 0 (4 of 5 right)
    reports = [{"num_parameters": 7, "train_seconds": 1.0, "chosen": None, "probabilities": probabilities,
                "test_accuracy": 0.0, "test_accuracy_seen": 0.0, "test_accuracy_unseen": 0.0,
                "test_accuracy_unseen_both": 0.0} for probabilities in (first, second)]
    summary = improvement.summarise_improve(SimpleNamespace(data=tiny_speeches), "classifier", reports)
    # mean rows: (0.4, 0.5, 0.1) -> 1 (label 0, wrong), (0.1, 0.35, 0.55) -> 2 (right), (0.2, 0.7, 0.1) -> 1 (right),
    # (0.4, 0.25, 0.35) -> 0 (right), (0.65, 0.275, 0.075) -> 0 (right)
    assert summary["ensemble"] == pytest.approx({"test_accuracy": 80.0, "test_accuracy_seen": 100 * 2 / 3,
                                                 "test_accuracy_unseen": 100.0, "test_accuracy_unseen_both": 100.0})
