"""End to end through the command line, on a slice of the course data; bad input gives one line and exit 2."""

import json
import shutil

import pytest
import torch

import main
import training
import utilities
from tokenizer import tokenizer_from_json
from transformer import TransformerClassifier, TransformerConfig, TransformerLM

FAST = ["--no-plots", "--seed", "1", "--device", "cpu"]  # the CPU, so that results do not depend on the machine


def run(capsys, *argv):
    status = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def without_times(result):
    return {k: v for k, v in result.items() if "seconds" not in k}


def test_part_one_learns_and_reports(small_data, tmp_path, capsys):
    status, out, _ = run(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path, "--epochs", "4",
                         "--extra-test", small_data / "test_CLS.tsv", *FAST)
    assert status == 0, out
    result = json.loads((tmp_path / "part_one.json").read_text())
    losses = [row["train_loss"] for row in result["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    train = {line.split("\t")[1].strip() for line in (small_data / "train_CLS.tsv").read_text().splitlines()}
    test = [line.split("\t")[1].strip() for line in (small_data / "test_CLS.tsv").read_text().splitlines()]
    seen = sum(text in train for text in test)
    final = result["final"]
    assert (final["num_test_seen"], final["num_test_unseen"]) == (seen, len(test) - seen)
    assert result["extra"]["test_CLS.tsv"] == final["test_accuracy"]
    assert "attention sanity checks passed" in out


def test_part_two_perplexity_falls(small_data, tmp_path, capsys):
    status, out, _ = run(capsys, "--part", "two", "--data-dir", small_data, "--out", tmp_path,
                         "--max-iters", "60", "--eval-interval", "30", *FAST)
    assert status == 0, out
    evals = json.loads((tmp_path / "part_two.json").read_text())["history"]
    assert [row["iteration"] for row in evals] == [30, 60]
    assert evals[1]["train_perplexity"] < evals[0]["train_perplexity"]
    assert set(evals[0]["perplexity"]) == {"obama", "wbush", "hbush"}


def test_part_three_compares_absolute_and_alibi_with_plots(small_data, tmp_path, capsys):
    status, out, _ = run(capsys, "--part", "three", "--data-dir", small_data, "--out", tmp_path, "--device", "cpu",
                         "--max-iters", "30", "--eval-interval", "30", "--epochs", "1", "--n-layer", "1")
    assert status == 0, out
    result = json.loads((tmp_path / "part_three.json").read_text())
    assert set(result["lm"]) == set(result["classifier"]) == {"absolute", "alibi"}
    assert result["lm"]["alibi"]["num_parameters"] < result["lm"]["absolute"]["num_parameters"]
    assert (tmp_path / "part_three_perplexity.png").stat().st_size > 0
    heatmaps = list((tmp_path / "attention").glob("part3_decoder_alibi_layer*_head*.png"))
    assert len(heatmaps) == 1 * 2  # every layer and head
    table = next(line for line in out.splitlines() if line.startswith("| alibi |"))
    cells = [cell.strip() for cell in table.strip("|").split("|")]
    final = result["lm"]["alibi"]["final"]
    assert cells[2:] == [f"{final['train_perplexity']:.2f}", *(f"{v:.2f}" for v in final["perplexity"].values()),
                         "the last iteration (30)"]


def test_best_preset_selects_on_validation_then_refits_on_everything(small_data, tmp_path, capsys):
    status, out, _ = run(capsys, "--part", "two", "--data-dir", small_data, "--out", tmp_path, "--preset", "best",
                         "--max-iters", "20", "--eval-interval", "10", "--n-layer", "1", "--batch-size", "8", *FAST)
    assert status == 0, out
    result = json.loads((tmp_path / "part_two.json").read_text())
    assert [row["iteration"] for row in result["selection"]] == [10, 20]  # the selection run, with validation
    chosen = min(result["selection"], key=lambda row: row["validation_perplexity"])["iteration"]
    assert result["chosen"] == chosen
    # the curve and the final figures are the refit's, which has no validation split
    assert [row["iteration"] for row in result["history"]] == list(range(10, chosen + 1, 10))
    assert result["final"] == {**{key: result["history"][-1][key] for key in ("iteration", "train_perplexity", "perplexity")},
                               "model": f"retrained on all of train_LM.txt for the {chosen} iterations validation chose"}
    assert "retrained on all of train_LM.txt" in out and f"final figures are those of {result['final']['model']}" in out
    status, out, _ = run(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path, "--preset", "best",
                         "--epochs", "3", "--n-layer", "1", "--batch-size", "16", *FAST)
    assert status == 0, out
    result = json.loads((tmp_path / "part_one.json").read_text())
    best = max(result["selection"], key=lambda row: row["validation_accuracy"])
    assert result["chosen"] == best["epoch"]
    assert [row["epoch"] for row in result["history"]] == list(range(1, best["epoch"] + 1))  # the refit stops there
    assert result["final"]["model"] == f"retrained on all of train_CLS.tsv for the {best['epoch']} epochs validation chose"


def test_same_seed_gives_identical_numbers(small_data, tmp_path, capsys):
    results = []
    for attempt in range(2):
        out_dir = tmp_path / str(attempt)
        assert run(capsys, "--part", "one", "--data-dir", small_data, "--out", out_dir, "--epochs", "2", "--n-layer", "2",
                   *FAST)[0] == 0
        results.append(without_times(json.loads((out_dir / "part_one.json").read_text())))
    assert results[0] == results[1]


def break_file(data, name, text=None, raw=None):
    path = data / name
    if raw is not None:
        path.write_bytes(raw)
    elif text is None:
        path.unlink()
    else:
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("name,text,raw,message", [
    ("train_CLS.tsv", None, None, "train_CLS.tsv: file not found (looked in --data-dir"),
    ("train_CLS.tsv", "0\tfine\n1 no tab here\n", None, "train_CLS.tsv:2: expected 'label<TAB>segment'"),
    ("test_CLS.tsv", "0\tfine\n7\tbad label\n", None, "test_CLS.tsv:2: label '7' is not 0, 1 or 2"),
    ("train_LM.txt", "  \n", None, "train_LM.txt: file is empty"),
    ("test_LM_obama.txt", None, b"caf\xe9 latte\n", "test_LM_obama.txt: not UTF-8 text"),
])
def test_bad_data_gives_one_line_and_status_2(copy_of_small_data, tmp_path, capsys, name, text, raw, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "part_one.json").write_text("{\"kept\": true}")
    break_file(copy_of_small_data, name, text, raw)
    status, _, err = run(capsys, "--part", "one", "--data-dir", copy_of_small_data, "--out", out_dir, *FAST)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert json.loads((out_dir / "part_one.json").read_text()) == {"kept": True}  # nothing lost


@pytest.mark.parametrize("argv,message", [
    (["--n-embd", "65"], "divisible by n_head"),
    (["--n-layer", "0"], "n_layer must be positive"),
    (["--batch-size", "-1"], "batch_size must be positive"),
    (["--part", "four"], "invalid choice"),
    (["--data-dir", "/nonexistent/speeches"], "data folder not found"),
    (["--device", "bogus"], "device 'bogus' is not usable here"),
    (["--device", "cuda:99"], "device 'cuda:99' is not usable here"),
    (["--part", "three", "--seeds", "0"], "--seeds must be positive, got 0"),
    (["--part", "three", "--workers", "-1"], "--workers must be positive, got -1"),
    (["--part", "three", "--scaling", "--scaling-lm-steps", "0"], "--scaling-lm-steps must be positive, got 0"),
    (["--improve"], "--improve applies to part three only: use it with --part three"),
    (["--part", "two", "--gap"], "--gap applies to part three only: use it with --part three"),
    (["--part", "two", "--seeds", "2"], "--seeds applies to part three only"),
    (["--scaling-full"], "--scaling-full applies to part three only"),
    (["--extra-test", "/nonexistent/typo.tsv"], "typo.tsv: file not found"),
    (["--part", "two", "--extra-test", "/nonexistent/typo.txt"], "typo.txt: file not found"),
])
def test_bad_options_give_one_line_and_status_2(small_data, tmp_path, capsys, argv, message):
    """Before any training: nothing is printed on stdout."""
    argv = ["--part", "one", "--data-dir", str(small_data), "--out", str(tmp_path)] + argv
    try:
        status = main.main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_explore_reports_each_variant_table_and_json(small_data, tmp_path, capsys):
    status, out, _ = run(capsys, "--part", "three", "--data-dir", small_data, "--out", tmp_path, "--explore",
                         "--variants", "base,alibi,local-window", "--seeds", "2", "--epochs", "1", "--n-layer", "1",
                         "--max-iters", "10", "--eval-interval", "10", "--workers", "1", "--device", "cpu")
    assert status == 0, out
    exploration = json.loads((tmp_path / "part_three.json").read_text())["exploration"]
    assert set(exploration["classifier"]) == set(exploration["lm"]) == {"base", "alibi", "local-window"}
    assert len(exploration["classifier"]["alibi"]["test_accuracy"]["values"]) == 2
    assert set(exploration["lm"]["alibi"]["extrapolation"]) == {"32", "64", "128"}
    assert exploration["attention_density"]["local-window"]["lm"] < 1.0
    for name in ("explore_classifier.md", "explore_lm.md", "explore_extrapolation.png", "explore_classifier.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_explore_rejects_unknown_variants_before_training(small_data, tmp_path, capsys):
    status, out, err = run(capsys, "--part", "three", "--data-dir", small_data, "--out", tmp_path, "--explore",
                           "--variants", "base,bogus", "--epochs", "1", "--max-iters", "10", "--eval-interval", "10", *FAST)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1 and "unknown variant(s) bogus" in err


def test_bpe_language_model_reports_word_level_perplexity(small_data, tmp_path, capsys):
    argv = ["--part", "two", "--data-dir", small_data, "--tokenizer", "bpe", "--bpe-vocab", "400"]
    status, out, _ = run(capsys, *argv, "--out", tmp_path, "--max-iters", "20", "--eval-interval", "20", *FAST)
    assert status == 0, out
    result = json.loads((tmp_path / "part_two.json").read_text())
    assert result["vocab_size"] == 400 and result["tokenizer"] == "bpe"
    final = result["final"]
    # one total NLL per file: exp(NLL / scored tokens) and exp(NLL / scored words), counted here with the same tokenizers
    context = training.make_run(data_dir=small_data, tokenizer="bpe", bpe_vocab=400)
    for name, text in context.data.test_lm.items():
        tokens, words = len(context.tokenizer.encode(text)) - 1, len(context.words.split(text)) - 1
        assert tokens != words
        assert final["word_perplexity"][name] == pytest.approx(final["perplexity"][name] ** (tokens / words), rel=1e-9)


def test_word_level_perplexity_equals_per_token_for_the_word_tokenizer(small_data):
    context = training.make_run(data_dir=small_data, device="cpu")
    torch.manual_seed(0)
    model = TransformerLM(training.model_config(context, "lm", n_layer=1))
    text = context.data.test_lm["hbush"]
    expected = training.perplexity(model, training.encode_stream(context, text), 32, context.device)
    assert training.word_perplexity(context, model, text, 32) == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def saved_decoder(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder")
    assert main.main(["--part", "two", "--data-dir", str(small_data), "--out", str(out), "--max-iters", "20",
                      "--eval-interval", "20", "--save", str(out / "checkpoint"), *FAST]) == 0
    return out


def test_a_loaded_checkpoint_reproduces_the_saved_perplexity_exactly(saved_decoder, small_data):
    model, tokenizer_json, metrics = utilities.build_and_load(saved_decoder / "checkpoint")
    saved = json.loads((saved_decoder / "part_two.json").read_text())["final"]["perplexity"]
    context = training.Run(training.RunSettings(), None, tokenizer_from_json(tokenizer_json), model.lm_head.weight.device,
                           None)
    text = (small_data / "test_LM_wbush.txt").read_text(encoding="utf-8")
    again = training.perplexity(model, training.encode_stream(context, text), 32, context.device)
    assert again == saved["wbush"] == metrics["perplexity"]["wbush"]


@pytest.mark.parametrize("strategy", ["greedy", "sample", "top-k", "top-p", "beam"])
def test_generate_prints_a_continuation(saved_decoder, capsys, strategy):
    status, out, err = run(capsys, "generate", "--checkpoint", saved_decoder / "checkpoint", "--prompt", "We will",
                           "--strategy", strategy, "--top-k", "5", "--top-p", "0.9", "--max-new-tokens", "6")
    assert status == 0, err
    assert out.startswith("We will ") and len(out.split()) == 2 + 6


@pytest.mark.parametrize("argv,message", [
    (["--prompt", ""], "the prompt has no tokens"),
    (["--prompt", "qqzx vvkw"], "every word of the prompt is outside the vocabulary"),
    (["--prompt", "We", "--strategy", "sample", "--temperature", "0"], "temperature must be positive"),
    (["--prompt", "We", "--strategy", "top-k", "--top-k", "0"], "top_k must be at least 1"),
    (["--prompt", "We", "--strategy", "top-p", "--top-p", "1.5"], "top_p must be in (0, 1]"),
])
def test_generate_bad_input_gives_one_line_and_status_2(saved_decoder, capsys, argv, message):
    status, _, err = run(capsys, "generate", "--checkpoint", saved_decoder / "checkpoint", *argv)
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_generate_from_a_broken_checkpoint_gives_one_line_and_status_2(saved_decoder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(saved_decoder / "checkpoint", broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    status, _, err = run(capsys, "generate", "--checkpoint", broken, "--prompt", "We will")
    assert status == 2 and "model.safetensors" in err and len(err.strip().splitlines()) == 1


def test_improve_puts_baselines_base_and_best_side_by_side(small_data, tmp_path, capsys):
    status, out, _ = run(capsys, "--part", "three", "--data-dir", small_data, "--out", tmp_path, "--improve", "--audit",
                         "--seeds", "2", "--epochs", "2", "--max-iters", "20", "--eval-interval", "10", "--n-layer", "1",
                         "--workers", "1", *FAST)
    assert status == 0, out
    assert "test_CLS: 120 segments;" in out  # the audit
    improve = json.loads((tmp_path / "part_three.json").read_text())["improve"]
    assert set(improve["classifier"]) == {"naive_bayes", "tfidf_logreg", "base", "best"}
    assert set(improve["lm"]) == {"kneser_ney", "kneser_ney_novel_mass", "base", "best"}
    rows = improve["gap"]["best vs kneser_ney"]["obama"]  # the best decoder's gap by word frequency, in nats
    assert sum(r["contribution"] for r in rows[:-1]) == pytest.approx(rows[-1]["contribution"])
    assert (tmp_path / "improve_gap_obama_vs_kneser_ney.md").is_file()
    best = improve["classifier"]["best"]
    assert len(best["test_accuracy"]["values"]) == 2
    for accuracy in (best["ensemble"]["test_accuracy"], *best["test_accuracy"]["values"]):  # a count of the 120 segments
        assert 120 * accuracy / 100 == pytest.approx(round(120 * accuracy / 100), abs=1e-4)  # a float32 mean
    # validation chooses when to stop (one of the evaluations); the final models are then retrained on everything
    assert all(iteration in (10, 20) for iteration in improve["lm"]["best"]["chosen"])
    assert all(epochs in (1, 2) for epochs in best["chosen"])
    assert (tmp_path / "improve_classifier.md").read_text().count("\n") == 2 + 6  # header, rule, 6 rows


# ---------------------------------------------------------------- inputs checked before any training


def test_an_extra_test_typo_stops_the_run_before_training(small_data, tmp_path, capsys):
    (tmp_path / "part_one.json").write_text('{"kept": true}')
    status, out, err = run(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path,
                           "--extra-test", small_data / "test_CLS.tsv", "--extra-test", tmp_path / "tset_CLS.tsv", *FAST)
    assert status == 2 and out == ""  # no epoch was trained
    assert err.strip().splitlines() == [f"main.py: error: {tmp_path / 'tset_CLS.tsv'}: file not found"]
    assert json.loads((tmp_path / "part_one.json").read_text()) == {"kept": True}


@pytest.mark.parametrize("part", ["two", "three"])
def test_a_one_token_extra_test_text_is_an_error_before_training(small_data, tmp_path, capsys, part):
    (tmp_path / "one_word.txt").write_text("Freedom\n", encoding="utf-8")
    status, out, err = run(capsys, "--part", part, "--data-dir", small_data, "--out", tmp_path / "out",
                           "--extra-test", tmp_path / "one_word.txt", *FAST)
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [f"main.py: error: {tmp_path / 'one_word.txt'}: 1 token(s), 1 word(s); "
                                        "perplexity needs at least 2 of each"]


def test_a_one_token_test_file_is_an_error_not_a_traceback(copy_of_small_data, tmp_path, capsys):
    (copy_of_small_data / "test_LM_hbush.txt").write_text("Thanks\n", encoding="utf-8")
    status, out, err = run(capsys, "--part", "two", "--data-dir", copy_of_small_data, "--out", tmp_path, *FAST)
    assert status == 2 and "iteration" not in out
    assert err.strip().splitlines() == ["main.py: error: test_LM_hbush.txt: 1 token(s), 1 word(s); "
                                        "perplexity needs at least 2 of each"]


# ---------------------------------------------------------------- generate: checkpoints it cannot use


def tiny_checkpoint(directory, model_class, kind):
    torch.manual_seed(0)
    model = model_class(TransformerConfig(vocab_size=4, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8))
    tokenizer = json.dumps({"type": "word", "itos": ["<pad>", "<unk>", "We", "will"]})
    return utilities.save_checkpoint(directory, model, {**model.config.to_dict(), "model": kind}, tokenizer, {})


@pytest.mark.parametrize("damage,message", [
    ("classifier", "holds a classifier; generation needs a decoder"),
    ("config-list", "config.json: expected a JSON dict, got list"),
    ("tokenizer-type", "unknown tokenizer type 'sentencepiece'"),
    ("tokenizer-field", "word tokenizer JSON: field 'itos' is missing"),
    ("tokenizer-list", "tokenizer.json: expected a JSON dict, got list"),
    ("tokenizer-merges", "bpe tokenizer JSON: a field has the wrong type"),
    ("tokenizer-special", "bpe tokenizer JSON: a field has the wrong type"),
    ("tokenizer-pair", "bpe tokenizer JSON: not enough values to unpack"),
    ("tokenizer-larger", "tokenizer.json has 6 tokens, the model's vocabulary 4"),
])
def test_generate_refuses_an_unusable_checkpoint_in_one_line(tmp_path, capsys, damage, message):
    checkpoint = tiny_checkpoint(tmp_path / "run", *((TransformerClassifier, "classifier") if damage == "classifier"
                                                     else (TransformerLM, "lm")))
    if damage == "config-list":
        (checkpoint / "config.json").write_text("[1, 2]", encoding="utf-8")
    damaged = {"tokenizer-type": '{"type": "sentencepiece"}', "tokenizer-field": '{"type": "word"}',
               "tokenizer-list": "[1]", "tokenizer-merges": '{"type": "bpe", "merges": 7, "specials": ["<pad>"]}',
               "tokenizer-special": '{"type": "bpe", "merges": [], "specials": ["<pad>", 5]}',
               "tokenizer-pair": '{"type": "bpe", "merges": [[1]], "specials": ["<pad>"]}',
               "tokenizer-larger": '{"type": "word", "itos": ["<pad>", "<unk>", "We", "will", "go", "on"]}'}
    if damage in damaged:
        (checkpoint / "tokenizer.json").write_text(damaged[damage], encoding="utf-8")
    status, out, err = run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "We will")
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_generate_never_emits_an_id_the_tokenizer_cannot_write(tmp_path, capsys):
    """A model whose vocabulary outgrows its tokenizer's (ids 4..39 here, which it prefers) still prints words."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=40, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8))
    with torch.no_grad():
        model.lm_head.bias[4:] = 100.0
    tokenizer = json.dumps({"type": "word", "itos": ["<pad>", "<unk>", "We", "will"]})
    checkpoint = utilities.save_checkpoint(tmp_path / "run", model, {**model.config.to_dict(), "model": "lm"}, tokenizer, {})
    status, out, err = run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "We will", "--max-new-tokens", "6")
    assert status == 0, err
    assert len(out.split()) == 8 and set(out.split()) <= {"We", "will"}
