"""The shared training loop (schedules, early stopping), the test groups and perplexity, against hand-computed
cases and brute-force loops."""

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import training
from dataset import load_speeches, stratified_split
from training import (
    TrainingConfig,
    classifier_report,
    encode_stream,
    fit,
    make_optimizer,
    make_run,
    model_config,
    perplexity,
    train_language_model,
    training_config,
    word_perplexity,
)
from transformer import Output, TransformerConfig, TransformerLM


def tiny_model():
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=20, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8))


def test_warmup_then_cosine_decay_to_ten_percent():
    model = tiny_model()
    optimizer, schedule = make_optimizer(model, TrainingConfig(learning_rate=1.0, warmup_steps=4, cosine_decay=True), 14)
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up
    assert rates[4] == 1.0 and abs(rates[9] - 0.55) < 1e-9  # halfway through the decay: 0.1 + 0.9 / 2
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))


def test_early_stopping_restores_the_best_validation_weights():
    model = tiny_model()
    snapshots, scores = [], iter([3.0, 1.0, 2.0, 5.0])  # the second evaluation is the best

    def evaluate(step, recent):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"step": step, "validation_score": next(scores)}

    generator = torch.Generator().manual_seed(0)
    batches = iter(lambda: (torch.randint(0, 20, (4, 8), generator=generator),) * 2, None)
    history = fit(model, batches, 8, 2, evaluate, TrainingConfig(), torch.device("cpu"))
    assert [row["step"] for row in history] == [2, 4, 6, 8]
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key])
    assert not torch.equal(snapshots[1]["lm_head.weight"], snapshots[3]["lm_head.weight"])


def test_stop_after_follows_the_full_schedule_up_to_that_step():
    """A run stopped after k of n steps ends where the full n-step run stood at step k (same rates, same batches),
    not where a k-step schedule (which decays sooner) would."""
    training = TrainingConfig(learning_rate=1e-2, warmup_steps=2, cosine_decay=True)

    def train(steps, stop_after=None):
        model = tiny_model()
        generator = torch.Generator().manual_seed(0)
        batches = iter(lambda: (torch.randint(0, 20, (4, 8), generator=generator),) * 2, None)
        states = []

        def evaluate(step, recent):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            return {"step": step}

        history = fit(model, batches, steps, 1, evaluate, training, torch.device("cpu"), stop_after=stop_after)
        return history, states

    _, full_states = train(10)
    stopped_history, stopped_states = train(10, stop_after=6)
    _, squeezed_states = train(6)
    assert [row["step"] for row in stopped_history] == [1, 2, 3, 4, 5, 6]
    for key, value in stopped_states[-1].items():
        assert torch.equal(value, full_states[5][key])
    assert not torch.equal(stopped_states[-1]["lm_head.weight"], squeezed_states[-1]["lm_head.weight"])


# ---------------------------------------------------------------- the seen / unseen / in-neither test groups


def test_test_splits_follow_the_overlap_flags_and_give_hand_computed_accuracies(tiny_speeches):
    # test segments: "One two." (seen, label 0), "Three four." (seen, 2), "Seven eight." (unseen, only in train_LM, 1),
    # "Nine ten." (in neither file, 0), "One two." (seen, 0)
    run = SimpleNamespace(data=tiny_speeches)
    splits = training.test_splits(run)
    assert splits["seen"].tolist() == [True, True, False, False, True]
    assert splits["unseen"].tolist() == [False, False, True, True, False]
    assert splits["unseen_both"].tolist() == [False, False, False, True, False]
    predicted = [0, 1, 1, 2, 0]  # right, wrong, right, wrong, right
    probabilities = torch.nn.functional.one_hot(torch.tensor(predicted), 3).float() * 0.6 + 0.1
    report = classifier_report(run, probabilities)
    assert report == pytest.approx({"test_accuracy": 100 * 3 / 5,
                                    "test_accuracy_seen": 100 * 2 / 3, "num_test_seen": 3,
                                    "test_accuracy_unseen": 100 * 1 / 2, "num_test_unseen": 2,
                                    "test_accuracy_unseen_both": 0.0, "num_test_unseen_both": 1})


def test_test_splits_on_the_course_data(course_data):
    speeches = load_speeches(course_data)
    train_texts = set(speeches.train_cls.texts)
    seen = [text in train_texts for text in speeches.test_cls.texts]
    neither = [text not in train_texts and text not in speeches.train_lm for text in speeches.test_cls.texts]
    splits = training.test_splits(SimpleNamespace(data=speeches))
    assert splits["seen"].tolist() == seen and splits["unseen"].tolist() == [not s for s in seen]
    assert splits["unseen_both"].tolist() == neither
    assert (sum(seen), len(seen) - sum(seen), sum(neither)) == (551, 199, 122)


# ---------------------------------------------------------------- perplexity against a brute-force loop


class ZeroLogits(torch.nn.Module):
    """Equal logits for every token: the model's perplexity is the vocabulary size, whatever the text."""

    def forward(self, idx, targets=None):
        return Output(torch.zeros(*idx.shape, 37), None, None)


def brute_force_nll(model, stream, block_size):
    """Summed -log P(token t | the tokens before it in its window) for t = 1 .. N-1, one forward pass each:
    windows are consecutive runs of block_size inputs, so token t sees tokens block_size * ((t-1) // block_size) .. t-1."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(stream)):
            start = (t - 1) // block_size * block_size
            logits = model(stream[start:t][None]).logits[0, -1]
            total -= logits.double().log_softmax(-1)[stream[t]].item()
    return total


def test_perplexity_of_equal_logits_is_the_vocabulary_size():
    stream = torch.randint(0, 37, (50,), generator=torch.Generator().manual_seed(0))
    assert perplexity(ZeroLogits(), stream, 8, torch.device("cpu")) == pytest.approx(37, rel=1e-6)


def test_perplexity_matches_a_token_by_token_loop():
    model = tiny_model().eval()
    # 601 tokens: 600 targets in 150 windows of 4, more than one evaluation batch of 128; then 7 tokens,
    # whose 6 targets do not fill a window of 4
    for length, block_size in ((601, 4), (7, 4)):
        stream = torch.randint(0, 20, (length,), generator=torch.Generator().manual_seed(length))
        expected = math.exp(brute_force_nll(model, stream, block_size) / (length - 1))
        assert perplexity(model, stream, block_size, torch.device("cpu")) == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_one_token_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="perplexity needs at least 2 tokens, got 1"):
        perplexity(ZeroLogits(), torch.tensor([3]), 8, torch.device("cpu"))


def test_word_level_perplexity_spreads_the_token_nll_over_the_words(small_data):
    run = make_run(data_dir=small_data, device="cpu", tokenizer="bpe", bpe_vocab=300)
    torch.manual_seed(0)
    model = TransformerLM(model_config(run, "lm", n_layer=1, n_embd=16, n_head=2)).eval()
    text = "\n".join(run.data.test_lm["hbush"].splitlines()[:3])
    stream = encode_stream(run, text)
    words = run.words.split(text)
    assert len(stream) > len(words)  # BPE splits words: a per-token figure would not be a per-word one
    expected = math.exp(brute_force_nll(model, stream, 32) / (len(words) - 1))
    assert word_perplexity(run, model, text, 32) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- under a validation split, one model's figures


def test_best_preset_reports_the_figures_of_the_model_it_returns(small_data):
    """With validation and refit, every figure in "final" is the returned (refit) model's, evaluated here afresh."""
    run = make_run(data_dir=small_data, device="cpu", preset="best",
                   training_flags={"max_iters": 20, "eval_interval": 10, "batch_size": 8},
                   model_flags={"n_layer": 1, "n_embd": 16, "block_size": 16})
    result = train_language_model(run, model_config(run, "lm"), training_config(run, "lm"), 1, log=lambda *a: None)
    model, report = result.model, result.report()
    chosen = min(report["selection"], key=lambda row: row["validation_perplexity"])["iteration"]
    assert report["chosen"] == chosen and report["final"]["iteration"] == chosen
    assert "retrained on all of train_LM.txt" in report["final"]["model"]
    assert report["history"][-1]["perplexity"] == report["final"]["perplexity"]  # the table and the curve agree
    cpu = torch.device("cpu")
    assert report["final"]["train_perplexity"] == perplexity(model, encode_stream(run, run.data.train_lm), 16, cpu)
    assert report["final"]["perplexity"] == {name: perplexity(model, encode_stream(run, text), 16, cpu)
                                             for name, text in run.data.test_lm.items()}


@pytest.mark.parametrize("validation", [0.1, 0.0])
def test_without_curves_the_figures_are_the_same_and_only_validation_is_scored_along_the_way(small_data, validation):
    """curves=False (the scaling study's) changes what is scored at each evaluation, not the model or its figures."""
    run = make_run(data_dir=small_data, device="cpu", model_flags={"n_layer": 1, "n_embd": 16, "block_size": 16})
    settings = replace(training_config(run, "lm"), max_iters=30, eval_interval=10, batch_size=8,
                       validation_fraction=validation, refit=False)
    patience = 1 if validation else None  # early stopping reads the validation split
    runs = [train_language_model(run, model_config(run, "lm"), settings, 1, log=lambda *a: None, patience=patience,
                                 train_eval_tokens=500, curves=curves) for curves in (True, False)]
    assert runs[0].final == runs[1].final and runs[0].chosen == runs[1].chosen
    assert all("perplexity" in row for row in runs[0].history)
    assert not any("perplexity" in row or "train_perplexity" in row for row in runs[1].history)
    assert [row.get("validation_perplexity") for row in runs[0].history] == [
        row.get("validation_perplexity") for row in runs[1].history]


def test_a_classifiers_extra_examples_come_from_the_segments_it_trains_on_and_join_its_batches(small_data, monkeypatch):
    """extra(indices) is asked for the selection's segments (never validation's), then for the refit's (all); what it
    gives joins the training batches of each."""
    run = make_run(data_dir=small_data, device="cpu", preset="best", training_flags={"epochs": 2, "batch_size": 32},
                   model_flags={"n_layer": 1, "n_embd": 16, "ff_hidden": 16, "block_size": 16})
    settings = training_config(run, "classifier")
    asked, batched = [], []

    def extra(indices):
        asked.append(list(indices))
        return [(f"an extra example {index}", index % 3) for index in range(7)]

    original = training.EpochBatches

    def recording_batches(ids, labels, *rest):
        batched.append(labels.tolist())
        return original(ids, labels, *rest)

    monkeypatch.setattr(training, "EpochBatches", recording_batches)
    result = training.train_classifier(run, model_config(run, "classifier"), settings, 1, log=lambda *a: None,
                                       extra=extra)
    labels = run.data.train_cls.labels
    kept, _ = stratified_split(labels, settings.validation_fraction, seed=0)
    assert settings.refit and asked == [kept.tolist(), list(range(len(labels)))]
    extra_labels = [index % 3 for index in range(7)]
    assert batched == [[labels[index] for index in kept.tolist()] + extra_labels, labels + extra_labels]
    assert result.final["extra_examples"] == 7


@pytest.mark.parametrize("preset", [None, "best"])
def test_classifier_report_is_the_returned_models_evaluated_afresh(small_data, preset):
    """The report's test figures (reused from the last epoch's evaluation when nothing was restored) are those of
    the returned model, predicted here again; without validation they are also the table's last epoch."""
    run = make_run(data_dir=small_data, device="cpu", preset=preset or "base", training_flags={"epochs": 3, "batch_size": 32},
                   model_flags={"n_layer": 1, "n_embd": 16, "ff_hidden": 16, "block_size": 16})
    config = model_config(run, "classifier")
    result = training.train_classifier(run, config, training_config(run, "classifier"), 1, log=lambda *a: None)
    ids, _ = training.classifier_tensors(run, run.data.test_cls, config.block_size)
    afresh = classifier_report(run, training.predict(result.model, ids, torch.device("cpu")))
    assert {key: result.final[key] for key in afresh} == afresh
    assert result.history[-1]["test_accuracy"] == result.final["test_accuracy"]
