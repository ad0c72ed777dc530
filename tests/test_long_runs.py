"""Training that scales: gradient accumulation, resumable checkpoints, a clean stop on signals, data parallel."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import data_parallel_worker
import pytest
import torch
import torch.nn.functional as F
from data_parallel_worker import padded_batch, tiny_config

import main
from dataset import EpochBatches, WindowBatches
from runtime.parallel import Parallel
from runtime.resume import STATE_FILE
from training import Harness, TrainingConfig, fit, train_step
from transformer import TransformerClassifier, TransformerLM

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--ff-hidden", "16", "--block-size", "8", "--no-plots"]
TINY = [*SMALL, "--batch-size", "4"]


def comparable(weights: dict) -> dict:
    """The weights without the key bias: its true gradient is zero (softmax ignores a score added to every key),
    so Adam, which divides by the gradient's size, turns float noise there into full-size steps."""
    weights = dict(weights)
    for name in [name for name in weights if name.endswith("attention.qkv.bias")]:
        query, _key, value = weights.pop(name).chunk(3)
        weights[name] = torch.cat([query, value])
    return weights


def gradients(model) -> dict:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("grad_accum", [2, 3, 9])  # 9 micro-batches of 7 rows: some are empty
def test_grad_accum_gives_the_gradient_of_the_whole_padded_classifier_batch(grad_accum):
    generator = torch.Generator().manual_seed(0)
    ids, labels = padded_batch(7, generator), torch.randint(0, 3, (7,), generator=generator)  # 7: a short last batch
    torch.manual_seed(0)
    model = TransformerClassifier(tiny_config())
    # the reference: torch's cross-entropy over the whole batch at once
    F.cross_entropy(model(ids).logits, labels).backward()
    expected = gradients(model)
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # leaves the weights, so the gradients can be compared
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: a pass-through
    loss, correct, count = train_step(model, optimizer, scaler, ids, labels, TrainingConfig(grad_accum=grad_accum), Parallel(),
                                      torch.device("cpu"), count_correct=True)
    assert expected.keys() == gradients(model).keys()
    for name, gradient in gradients(model).items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        logits = model(ids).logits
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert (correct, count) == ((logits.argmax(-1) == labels).sum().item(), 7)


def test_grad_accum_trains_like_the_whole_batch_over_epochs_with_a_short_last_batch():
    """23 segments in batches of 8: every third batch has 7 rows; two epochs of 3 micro-batches against 1."""
    generator = torch.Generator().manual_seed(1)
    ids, labels = padded_batch(23, generator), torch.randint(0, 3, (23,), generator=generator)
    runs = []
    for grad_accum in (1, 3):
        torch.manual_seed(0)
        model = TransformerClassifier(tiny_config())
        batches = EpochBatches(ids, labels, 8, torch.Generator().manual_seed(0))
        history = fit(model, batches, 6, 3, lambda step, recent: {"recent": recent},
                      TrainingConfig(learning_rate=1e-2, grad_accum=grad_accum), torch.device("cpu"))
        runs.append((history, model.state_dict()))
    (history, weights), (accumulated_history, accumulated_weights) = runs
    for row, accumulated_row in zip(history, accumulated_history):
        for (loss, correct, count), (other_loss, other_correct, other_count) in zip(row["recent"], accumulated_row["recent"]):
            assert other_loss == pytest.approx(loss, rel=1e-5) and (other_correct, other_count) == (correct, count)
    assert [count for _, _, count in history[0]["recent"]] == [8, 8, 7]
    accumulated_weights = comparable(accumulated_weights)
    for name, value in comparable(weights).items():
        torch.testing.assert_close(accumulated_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


def lm_fit(harness, steps=7):
    """A tiny decoder trained for `steps` on random windows, evaluated every 3 steps; (history, weights)."""
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(dropout=0.1))  # dropout: the random-number state must resume too
    stream = torch.randint(0, 30, (200,), generator=torch.Generator().manual_seed(0))
    batches = WindowBatches(stream, 8, 4, torch.Generator().manual_seed(0))
    config = TrainingConfig(learning_rate=1e-2, warmup_steps=2, cosine_decay=True)
    history = fit(model, batches, steps, 3, lambda step, recent: {"step": step, "recent": recent}, config,
                  torch.device("cpu"), count_correct=False, harness=harness)
    return history, model.state_dict()


def test_a_resumed_fit_ends_exactly_where_the_uninterrupted_one_does(tmp_path):
    history, weights = lm_fit(None)
    lm_fit(Harness(checkpoint_dir=tmp_path / "a", checkpoint_every=4))  # leaves its checkpoint of step 4
    resumed_history, resumed_weights = lm_fit(Harness(checkpoint_dir=tmp_path / "b", resume=tmp_path / "a"))
    assert resumed_history == history
    for name, value in weights.items():
        assert torch.equal(resumed_weights[name], value), name


def without_times(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in ("seconds", "train_seconds")}


@pytest.mark.parametrize("part,argv", [
    ("one", ["--epochs", "2", "--checkpoint-every", "40"]),  # 400 segments / 16: step 40 is in the second epoch
    ("two", ["--max-iters", "25", "--eval-interval", "10", "--checkpoint-every", "15"]),
])
def test_main_resumed_from_a_checkpoint_reports_the_numbers_of_the_whole_run(small_data, tmp_path, capsys, part, argv):
    common = ["--part", part, "--data-dir", str(small_data), *SMALL, *argv]
    assert main.main([*common, "--out", str(tmp_path / "whole")]) == 0  # its last checkpoint is of the step asked for
    checkpoint = tmp_path / "whole" / f"checkpoint_part_{part}"
    assert main.main([*common, "--out", str(tmp_path / "resumed"), "--resume", str(checkpoint)]) == 0
    assert "resuming from" in capsys.readouterr().out
    whole, resumed = (json.loads((tmp_path / name / f"part_{part}.json").read_text()) for name in ("whole", "resumed"))
    assert without_times(resumed) == without_times(whole)


@pytest.mark.parametrize("part,argv", [
    ("one", ["--epochs", "3", "--batch-size", "16", "--checkpoint-every", "20"]),  # 360 selection segments: 23 steps an epoch
    ("two", ["--max-iters", "20", "--eval-interval", "10", "--checkpoint-every", "7"]),
])
def test_a_refit_preset_resumes_both_of_its_trainings(small_data, tmp_path, capsys, part, argv):
    """Under --preset best the selection run and the refit each leave checkpoints (the refit's in refit/, the
    selection's also of its last step); resumed from the whole run's folder, the selection is restored as it ended,
    the refit goes on from its last checkpoint, and the report is the whole run's."""
    common = ["--part", part, "--data-dir", str(small_data), *SMALL, "--preset", "best", *argv]
    assert main.main([*common, "--out", str(tmp_path / "whole")]) == 0
    checkpoint = tmp_path / "whole" / f"checkpoint_part_{part}"
    selection_step = torch.load(checkpoint / STATE_FILE, weights_only=True)["step"]
    refit_step = torch.load(checkpoint / "refit" / STATE_FILE, weights_only=True)["step"]
    whole = json.loads((tmp_path / "whole" / f"part_{part}.json").read_text())
    last = {"one": lambda: 23 * len(whole["selection"]), "two": lambda: whole["selection"][-1]["iteration"]}
    refit_last = {"one": lambda: 25 * whole["chosen"], "two": lambda: whole["chosen"]}
    assert selection_step == last[part]() and 0 < refit_step < refit_last[part]()  # the refit resumes mid-way
    capsys.readouterr()
    assert main.main([*common, "--out", str(tmp_path / "resumed"), "--resume", str(checkpoint)]) == 0
    assert capsys.readouterr().out.count("resuming from") == 2
    resumed = json.loads((tmp_path / "resumed" / f"part_{part}.json").read_text())
    assert without_times(resumed) == without_times(whole)


def test_resuming_another_configuration_or_code_version_gives_one_line_and_status_2(small_data, tmp_path, capsys):
    common = ["--part", "two", "--data-dir", str(small_data), "--out", str(tmp_path), *TINY, "--max-iters", "6",
              "--eval-interval", "6"]
    assert main.main([*common, "--checkpoint-every", "3"]) == 0
    checkpoint = tmp_path / "checkpoint_part_two"
    capsys.readouterr()
    for changes, message in ((["--learning-rate", "0.002"], "training.learning_rate is 0.001 there, 0.002 here"),
                             (["--n-embd", "32"], "model.n_embd is 16 there, 32 here"),
                             (["--seed", "7"], "seed is 42 there, 7 here")):
        assert main.main([*common, *changes, "--resume", str(checkpoint)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    state["identity"]["code"]["transformer.py"] = "0" * 16
    torch.save(state, checkpoint / STATE_FILE)
    assert main.main([*common, "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another code version (transformer.py has changed)" in err
    assert main.main([*common, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err


def wait_for_steps(log: Path, after: int, process, timeout=60.0):
    """Wait until the JSON-lines log shows a step past `after` (training is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if log.is_file() and any(json.loads(line)["step"] > after for line in log.read_text().splitlines()[-3:]):
            return
        time.sleep(0.1)
    pytest.fail("training did not start")


def test_sigint_leaves_a_resumable_checkpoint_and_sigterm_stops_the_resumed_run(small_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    out.mkdir()
    (out / "earlier.json").write_text("{}")
    argv = [sys.executable, str(ROOT / "main.py"), "--part", "two", "--data-dir", str(small_data), "--out", str(out),
            *TINY, "--max-iters", "1000000", "--eval-interval", "1000000", "--log-dir", str(log)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = []
    for signal_number, extra in ((signal.SIGINT, []), (signal.SIGTERM, ["--resume", str(out / "checkpoint_part_two")])):
        process = subprocess.Popen(argv + extra, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        wait_for_steps(log / "part_two.jsonl", steps[-1] if steps else 0, process)
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 128 + signal_number, err
        assert "resume with: python main.py --part two" in err and "Traceback" not in err
        steps.append(torch.load(out / "checkpoint_part_two" / STATE_FILE, weights_only=True)["step"])
    assert 0 < steps[0] < steps[1]  # the second run went on from the first one's checkpoint
    assert (out / "earlier.json").read_text() == "{}"  # nothing already in the output folder is lost


def test_two_gloo_processes_train_like_one(tmp_path):
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(data_parallel_worker.run, args=(2, port, str(tmp_path)), nprocs=2)
    alone, model = data_parallel_worker.classifier_fit(Parallel())
    for rank in (0, 1):  # every process holds process 0's evaluations, and the same weights
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert len(result["history"]) == len(alone) == 2
        for row, alone_row in zip(result["history"], alone):
            assert [count for _, _, count in row["recent"]] == [count for _, _, count in alone_row["recent"]] == [8, 8, 7]
            assert [loss for loss, _, _ in row["recent"]] == pytest.approx([loss for loss, _, _ in alone_row["recent"]],
                                                                           rel=1e-5)
        weights = comparable(result["weights"])
        for name, value in comparable(model.state_dict()).items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_log_dir_holds_every_step_and_evaluation(small_data, tmp_path):
    assert main.main(["--part", "two", "--data-dir", str(small_data), "--out", str(tmp_path), *TINY, "--max-iters", "6",
                      "--eval-interval", "3", "--log-dir", str(tmp_path / "log"), "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "log" / "part_two.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    evaluations = [row["evaluation"] for row in rows if "evaluation" in row]
    assert evaluations == json.loads((tmp_path / "part_two.json").read_text())["history"]

