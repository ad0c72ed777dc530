"""Checkpoints: a faithful round trip, a clear CheckpointError for every broken file, and atomic saves."""

import json
import os
import random

import pytest
import torch

import utilities
from transformer import TransformerClassifier, TransformerConfig, TransformerLM
from utilities import CHECKPOINT_FILES, CheckpointError, build_and_load, load_checkpoint, save_checkpoint

TOKENIZER = json.dumps({"type": "word", "itos": ["<pad>", "<unk>", "a", "b"]})


def config(**changes) -> TransformerConfig:
    return TransformerConfig(vocab_size=20, block_size=8, n_embd=16, n_head=2, n_layer=2, ff_hidden=24, **changes)


def lm(**changes) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(config(**changes))


def save(directory, model, kind="lm", metrics=None, **config_changes):
    options = {**model.config.to_dict(), **config_changes, "model": kind}
    return save_checkpoint(directory, model, options, TOKENIZER, metrics or {"perplexity": 123.4})


def logits(model):
    with torch.no_grad():
        return model.eval()(torch.tensor([[3, 1, 4, 1, 5, 9]])).logits


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True, "position": "disentangled", "n_kv_heads": 1}])
def test_lm_round_trip_gives_identical_logits(tmp_path, changes):
    model = lm(**changes)
    save(tmp_path / "run", model, metrics={"perplexity": 99.5, "steps": [1, 2]})
    loaded, tokenizer_json, metrics = build_and_load(tmp_path / "run")
    assert isinstance(loaded, TransformerLM) and not loaded.training
    assert loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))
    assert tokenizer_json == TOKENIZER and metrics == {"perplexity": 99.5, "steps": [1, 2]}
    state_dict, config_dict, _, _ = load_checkpoint(tmp_path / "run")
    assert config_dict == {**model.config.to_dict(), "model": "lm"}
    assert state_dict.keys() == utilities.unique_state_dict(model).keys()  # a tied matrix once


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TransformerClassifier(config(pooling="cls"))
    save(tmp_path / "cls", model, kind="classifier")
    loaded, _, _ = build_and_load(tmp_path / "cls")
    assert isinstance(loaded, TransformerClassifier)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_missing_file(tmp_path, name):
    save(tmp_path / "run", lm())
    (tmp_path / "run" / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: missing from the checkpoint$"):
        build_and_load(tmp_path / "run")


def test_tied_matrix_is_stored_once(tmp_path):
    from safetensors import safe_open

    save(tmp_path / "run", lm(tie_embeddings=True))
    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "decoder.token_embedding.weight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_weights(tmp_path, damage):
    save(tmp_path / "run", lm())
    name = "model.safetensors"
    weights = tmp_path / "run" / name
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": random.Random(0).randbytes(2000)}[damage])
    with pytest.raises(CheckpointError, match=rf"{name}: unreadable weights, truncated or corrupt \(\w+\)$") as caught:
        load_checkpoint(tmp_path / "run")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "metrics.json"])
def test_invalid_json(tmp_path, name):
    save(tmp_path / "run", lm())
    (tmp_path / "run" / name).write_text('{"vocab_size": 20,', encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{name}: invalid JSON \("):
        load_checkpoint(tmp_path / "run")


def test_config_of_another_size(tmp_path):
    save(tmp_path / "run", lm(), n_embd=32)  # weights of a 16-wide model under a 32-wide config
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match config\.json: .* tensors of the wrong shape"):
        build_and_load(tmp_path / "run")


def test_config_of_another_depth(tmp_path):
    save(tmp_path / "run", lm(), n_layer=3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match config\.json: 12 missing and 0 unexpected"):
        build_and_load(tmp_path / "run")


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_embd": 15}, r"config\.json: cannot build the model \(n_embd \(15\) must be divisible by n_head \(2\)\)"),
    ({"flash": True}, r"config\.json: cannot build the model \(.*'flash'\)"),
    ({"model": "seq2seq"}, r"config\.json: 'model' must be one of classifier, lm, got 'seq2seq'"),
])
def test_config_that_cannot_build_a_model(tmp_path, changes, message):
    save(tmp_path / "run", lm())
    path = tmp_path / "run" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")
    with pytest.raises(CheckpointError, match=message):
        build_and_load(tmp_path / "run")


def test_save_needs_the_model_kind(tmp_path):
    with pytest.raises(ValueError, match="config_dict\\['model'\\] must be one of classifier, lm, got None"):
        save_checkpoint(tmp_path / "run", lm(), lm().config.to_dict(), TOKENIZER, {})


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save(tmp_path / "run", lm(), metrics={"version": 1})
    torch.manual_seed(1)
    newer = TransformerLM(config())
    save(tmp_path / "run", newer, metrics={"version": 2})
    loaded, _, metrics = build_and_load(tmp_path / "run")
    assert metrics == {"version": 2} and torch.equal(logits(loaded), logits(newer))
    assert os.listdir(tmp_path) == ["run"]


def check_previous_checkpoint_intact(tmp_path, model):
    loaded, _, metrics = build_and_load(tmp_path / "run")
    assert metrics == {"version": 1}
    assert torch.equal(logits(loaded), logits(model))
    assert os.listdir(tmp_path) == ["run"]  # no temporary directory left behind
    assert sorted(os.listdir(tmp_path / "run")) == sorted(CHECKPOINT_FILES)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = lm()
    save(tmp_path / "run", model, metrics={"version": 1})

    def save_dies_midway(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\x08\x00\x00\x00 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(utilities.safetensors.torch, "save_file", save_dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "run", TransformerLM(config()), metrics={"version": 2})
    monkeypatch.undo()
    check_previous_checkpoint_intact(tmp_path, model)


def test_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    model = lm()
    save(tmp_path / "run", model, metrics={"version": 1})
    real_replace, calls = os.replace, []

    def second_rename_fails(source, target):
        calls.append(target)
        if len(calls) == 2:  # the old checkpoint is aside, the new one not yet in place
            raise OSError("disk unplugged")
        real_replace(source, target)

    monkeypatch.setattr(utilities.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk unplugged"):
        save(tmp_path / "run", TransformerLM(config()), metrics={"version": 2})
    monkeypatch.undo()
    check_previous_checkpoint_intact(tmp_path, model)


def test_first_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(utilities.safetensors.torch, "save_file",
                        lambda tensors, path, metadata=None: (_ for _ in ()).throw(RuntimeError("out of space")))
    with pytest.raises(RuntimeError, match="out of space"):
        save(tmp_path / "run", lm())
    assert os.listdir(tmp_path) == []
