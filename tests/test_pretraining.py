"""MLM pretraining and token dropout (pretraining.py, dataset.drop_tokens): masking statistics against BERT's
specification over many draws, the loss against a brute-force loop, the fine-tuning's starting weights, and the
defaults left as the course's."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import training
from dataset import TokenDropout, drop_tokens, token_dropout
from studies import pretraining
from studies.pretraining import IGNORE, MaskedLM, MaskingConfig, mask_tokens
from tokenizer import PAD_ID, UNK_ID
from transformer import TransformerClassifier, TransformerConfig

VOCAB = 40  # words 2..39; [MASK] is 40


def padded_ids(rows: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """Random word ids with random lengths (1..block_size), right-padded: (rows, block_size)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, block_size), generator=generator)
    lengths = torch.randint(1, block_size + 1, (rows, 1), generator=generator)
    return ids.masked_fill(torch.arange(block_size) >= lengths, PAD_ID)


def test_masking_follows_bert_over_many_draws():
    ids = padded_ids(4000, 16)
    real = ids != PAD_ID
    inputs, targets = mask_tokens(ids, VOCAB, MaskingConfig(), torch.Generator().manual_seed(1))
    chosen = targets != IGNORE
    assert not (chosen & ~real).any() and (inputs[~real] == PAD_ID).all()  # padding is never chosen nor changed
    assert (targets[chosen] == ids[chosen]).all()  # the target is the original word
    assert (inputs[~chosen] == ids[~chosen]).all()  # only chosen positions change
    # ~34,000 real positions: the share's standard error is about 0.002
    assert chosen.sum() / real.sum() == pytest.approx(0.15, abs=0.01)
    masked = (inputs == VOCAB)[chosen].float().mean()
    kept = (inputs == ids)[chosen].float().mean()  # a random word equal to the original counts here: 0.1 / 38
    random_word = ((inputs != VOCAB) & (inputs != ids))[chosen].float().mean()
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / (VOCAB - 2), abs=0.015)
    assert random_word == pytest.approx(0.1 - 0.1 / (VOCAB - 2), abs=0.015)
    replaced = inputs[chosen & (inputs != VOCAB) & (inputs != ids)]
    assert ((replaced >= 2) & (replaced < VOCAB)).all()  # a real word: never <pad>, <unk> or [MASK]


def test_mlm_loss_is_the_mean_over_the_chosen_positions_only():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=VOCAB + 1, block_size=8, n_embd=16, n_head=2, n_layer=1, ff_hidden=16,
                               init_std=0.02)
    model = MaskedLM(config).eval()
    ids = padded_ids(6, 8, seed=3)
    inputs, targets = mask_tokens(ids, VOCAB, MaskingConfig(rate=0.5), torch.Generator().manual_seed(2))
    loss = model(inputs, targets).loss
    # brute force: logits at every position from the parts, then -log p of the target at each chosen one
    h, _ = model.encoder(model.encoder.token_embedding(inputs), inputs != PAD_ID)
    log_probs = (model.transform(h) @ model.encoder.token_embedding.weight.T + model.bias).log_softmax(-1)
    terms = [-log_probs[b, t, targets[b, t]] for b in range(6) for t in range(8) if targets[b, t] != IGNORE]
    assert len(terms) > 0 and loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    loss.backward()
    assert model.encoder.token_embedding.weight.grad[VOCAB].abs().sum() > 0  # [MASK] has a row, and it learns


def test_token_dropout_replaces_the_requested_share_by_unk_and_never_padding():
    ids = padded_ids(4000, 16)
    real = ids != PAD_ID
    dropped_ids = drop_tokens(ids, 0.2, torch.Generator().manual_seed(0))
    dropped = dropped_ids != ids
    assert not (dropped & ~real).any() and (dropped_ids[~real] == PAD_ID).all()
    assert (dropped_ids[dropped] == UNK_ID).all()
    assert dropped.sum() / real.sum() == pytest.approx(0.2, abs=0.01)
    labels = torch.arange(4000)
    batches = TokenDropout(iter([(ids, labels)]), 0.2, torch.Generator().manual_seed(0))
    batch_ids, batch_labels = next(batches)
    assert torch.equal(batch_ids, dropped_ids) and torch.equal(batch_labels, labels)


@pytest.fixture(scope="module")
def tiny_run(small_data):
    return training.make_run(data_dir=small_data, device="cpu",
                             model_flags={"n_layer": 1, "n_embd": 16, "ff_hidden": 16, "block_size": 16},
                             training_flags={"batch_size": 32, "epochs": 2})


def training_inputs(run, config, settings, build_model=None, wrap_batches=None):
    """The id batches the classifier is trained on (eval passes excluded), and the returned model."""
    seen = []

    def build(config):
        model = build_model(config) if build_model else TransformerClassifier(config)
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
        return model

    model = training.train_classifier(run, config, settings, 0, log=lambda *a: None, build_model=build,
                                      wrap_batches=wrap_batches).model
    return torch.cat(seen), model


def test_defaults_are_the_courses_and_train_without_token_dropout(tiny_run):
    config = training.model_config(tiny_run, "classifier")
    assert config.vocab_size == tiny_run.tokenizer.vocab_size  # no [MASK] row outside pretraining
    inputs, _ = training_inputs(tiny_run, config, training.training_config(tiny_run, "classifier"))
    assert not (inputs == UNK_ID).any()  # the training segments hold no <unk>: nothing was dropped
    settings = training.training_config(tiny_run, "classifier")
    dropped, _ = training_inputs(tiny_run, config, settings, wrap_batches=token_dropout(0.3))
    share = (dropped == UNK_ID).sum() / (dropped != PAD_ID).sum()
    assert share == pytest.approx(0.3, abs=0.03)


def test_fine_tuning_starts_from_the_pretrained_encoder(tiny_run):
    config = training.model_config(tiny_run, "classifier", init_std=0.02)
    masking = MaskingConfig(steps=3, batch_size=16, eval_every=3)
    mlm, report = pretraining.pretrain(tiny_run, config, masking, 0, held_out=[], log=lambda *a: None)
    mask_row = pretraining.with_mask_row(config, tiny_run.tokenizer)
    assert mask_row.vocab_size == tiny_run.tokenizer.vocab_size + 1 == mlm.encoder.token_embedding.num_embeddings
    assert report["history"][-1]["step"] == 3
    pretrained = {name: tensor.clone() for name, tensor in mlm.encoder.state_dict().items()}
    starts = []

    def build(config):
        model = pretraining.from_encoder(mlm.encoder)(config)
        starts.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return model

    settings = replace(training.training_config(tiny_run, "classifier"), validation_fraction=0.1, refit=True)
    model = training.train_classifier(tiny_run, mask_row, settings, 0, log=lambda *a: None, build_model=build).model
    assert len(starts) == 2  # the selection run and the refit both start from the pretrained encoder
    for start in starts:
        for name, tensor in pretrained.items():
            assert torch.equal(start[f"encoder.{name}"], tensor), name
    assert not torch.equal(model.encoder.token_embedding.weight, pretrained["token_embedding.weight"])  # it trained


def test_pretraining_text_leaves_out_the_validation_segments(tiny_run):
    held_out = tiny_run.data.train_cls.texts[:5]
    texts = pretraining.unlabelled_texts(tiny_run.data, set(held_out))
    assert not any(segment in text for text in texts for segment in held_out)
    assert len(texts) == len(set(texts)) and set(tiny_run.data.train_cls.texts[5:]) - set(held_out) <= set(texts)
    rows = pretraining.pretraining_rows(tiny_run.tokenizer, texts, 16)
    # each text: its full pieces of 16 tokens, then the remainder if it has at least 2 tokens
    lengths = [len(tiny_run.tokenizer.encode(text)) for text in texts]
    pieces = [16] * sum(n // 16 for n in lengths) + [n % 16 for n in lengths if n % 16 >= 2]
    assert sorted((rows != PAD_ID).sum(1).tolist()) == sorted(pieces)


def test_bad_masking_settings_are_refused():
    with pytest.raises(ValueError, match="masking shares"):
        MaskingConfig(to_mask=0.9, to_random=0.2).validate()
    with pytest.raises(ValueError, match="token dropout"):
        token_dropout(1.0)
    assert F.cross_entropy(torch.zeros(1, 3), torch.tensor([IGNORE]), reduction="sum") == 0  # IGNORE is torch's
