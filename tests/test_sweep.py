"""The second-round sweep: its candidates compose with the first round as the README says, and it runs."""

import re
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest

import main
import training
from studies import sweep


@pytest.fixture
def run():
    return SimpleNamespace(settings=training.RunSettings(), tokenizer=SimpleNamespace(vocab_size=100),
                           data=SimpleNamespace(class_names=("a", "b", "c")))


def test_preset_is_the_sweep_winner_on_top_of_the_first_round(run):
    preset = training.model_config(run, "classifier", preset="best")
    winner = training.model_config(run, "classifier", preset="best",
                               **{**sweep.FIRST_ROUND["classifier"], **sweep.CANDIDATES["no-position+swiglu"]})
    first_round = training.model_config(run, "classifier", preset="best", **sweep.FIRST_ROUND["classifier"])
    assert winner == preset
    assert (first_round.feedforward, first_round.position) == ("gelu", "learned")


def test_sweep_reports_validation_only(small_data, capsys, monkeypatch):
    # the output's format and figures, on a 2-epoch version of the 30-epoch preset
    preset = training.PRESETS["best"]
    monkeypatch.setitem(training.PRESETS, "best", replace(preset, classifier=(preset.classifier[0],
                                                                              {**preset.classifier[1], "epochs": 2})))
    assert main.main(["sweep", "--data-dir", str(small_data), "--task", "classifier", "--candidates", "none",
                      "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    match = re.fullmatch(r"classifier none +seed 42: best validation acc % ([\d.]+) at (\d+)\n", out)
    assert match and int(match[2]) in (1, 2)
    # the validation split holds round(10%) of each class of the slice's 400 segments: the accuracy is a count of them
    labels = Counter(line.split("\t")[0] for line in (small_data / "train_CLS.tsv").read_text().splitlines())
    held_out = sum(round(0.1 * count) for count in labels.values())
    correct = float(match[1]) * held_out / 100
    assert abs(correct - round(correct)) <= 0.005 * held_out / 100
    assert "test" not in out


@pytest.mark.parametrize("argv", [["--candidates", "foo"], ["--seeds", "x"], ["--seeds", "0"]])
def test_sweep_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["sweep", "--task", "lm", *argv])
    assert exit_info.value.code == 2


def test_sweep_names_a_missing_data_folder(tmp_path, capsys):
    assert main.main(["sweep", "--task", "lm", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "data folder not found" in capsys.readouterr().err
