"""Part three's study table: a study is one row, whose flag and options main.py builds and whose results, tables and
plot it writes; and the library's settings, which know nothing of argparse."""

import json

import pytest

import main
import training
from studies.study import Option, Study

TINY = ["--device", "cpu", "--no-plots", "--n-layer", "1", "--n-embd", "16", "--block-size", "16", "--epochs", "1",
        "--max-iters", "10", "--eval-interval", "10"]


def count_models(run, context):
    """A study that trains nothing: what part three handed it."""
    return {"models": sorted(context.models), "size": context.options["toy_size"], "seed": context.seed,
            "seeds": context.seeds, "workers": context.workers}, []


def refuse_odd(options):
    if options["toy_size"] % 2:
        raise ValueError(f"--toy-size must be even, got {options['toy_size']}")


TOY = Study("toy", "toy_study", "toy", "a study made by the test", count_models,
            lambda results: {"toy_table": f"| size |\n|---|\n| {results['size']} |"},
            options=(Option("toy_size", int, 4, "an even number", minimum=2),), check=refuse_odd)


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setattr(main, "STUDIES", (*main.STUDIES, TOY))


def test_a_new_row_is_a_flag_its_options_and_an_entry_in_the_json(with_toy, small_data, tmp_path, capsys):
    argv = ["--part", "three", "--data-dir", str(small_data), "--out", str(tmp_path), "--toy", "--toy-size", "6",
            "--seeds", "2", "--workers", "1", "--seed", "7", *TINY]
    assert main.main(argv) == 0
    result = json.loads((tmp_path / "part_three.json").read_text())
    assert result["toy_study"] == {"models": ["decoder absolute", "decoder alibi", "encoder absolute", "encoder alibi"],
                                   "size": 6, "seed": 7, "seeds": 2, "workers": 1}
    assert (tmp_path / "toy_table.md").read_text() == "| size |\n|---|\n| 6 |\n"
    assert "== toy" in capsys.readouterr().out
    assert not any(name in result for name in ("exploration", "improve", "scaling", "gap", "heads", "t5"))  # not asked for


@pytest.mark.parametrize("argv, message", [
    (["--part", "one", "--toy"], "--toy applies to part three only: use it with --part three"),
    (["--part", "two", "--toy-size", "8"], "--toy-size applies to part three only: use it with --part three"),
    (["--part", "three", "--toy", "--toy-size", "1"], "--toy-size must be at least 2, got 1"),
    (["--part", "three", "--toy", "--toy-size", "5"], "--toy-size must be even, got 5"),
])
def test_a_rows_options_are_checked_before_any_training(with_toy, small_data, tmp_path, capsys, argv, message):
    assert main.main([*argv, "--data-dir", str(small_data), "--out", str(tmp_path), *TINY]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"main.py: error: {message}"


def test_every_study_has_its_flag_and_a_distinct_json_key():
    parser = main.build_parser()
    flags = {action.dest for action in parser._actions}
    assert all(study.flag in flags and all(option.name in flags for option in study.options) for study in main.STUDIES)
    keys = [study.key for study in main.STUDIES]
    assert len(set(keys)) == len(keys) and "lm" not in keys and "classifier" not in keys  # the comparison's own keys


def test_the_command_line_becomes_settings_with_only_the_flags_given():
    args = main.build_parser().parse_args(["--part", "two", "--n-layer", "2", "--learning-rate", "0.01", "--no-plots"])
    settings = main.run_settings(args)
    assert settings.model_flags == {"n_layer": 2} and settings.training_flags == {"learning_rate": 0.01}
    assert not settings.plots and settings.preset == "base" and settings.precision == "fp32"


@pytest.mark.parametrize("keywords, message", [
    ({"preset": "fastest"}, "unknown preset 'fastest'"),
    ({"model_flags": {"dropout": 0.5}}, "unknown option 'dropout'"),
    ({"training_flags": {"weight_decay": 0.1}}, "unknown option 'weight_decay'"),
])
def test_settings_refuse_what_no_command_line_could_give(keywords, message):
    with pytest.raises(ValueError, match=message):
        training.RunSettings(**keywords).validate()
