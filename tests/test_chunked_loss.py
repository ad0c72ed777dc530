"""The chunked decoder loss (lm_loss="chunked") against torch's F.cross_entropy over the whole logits: the same loss
and the same gradients for every parameter, with tied and untied heads, label smoothing, row blocks that do not divide
the batch, a scaled loss (gradient accumulation) and bf16 autocast; evaluation still returns the logits."""

import pytest
import torch

from transformer import ChunkedSoftmaxLoss, TransformerConfig, TransformerLM

SMALL = dict(vocab_size=97, block_size=12, n_embd=32, n_head=4, n_layer=2, ff_hidden=48)


def pair(**changes):
    """The same weights behind the course's loss and the chunked one (blocks of 7 rows: 36 rows leave a remainder)."""
    torch.manual_seed(0)
    full = TransformerLM(TransformerConfig(**SMALL, **changes))
    chunked = TransformerLM(TransformerConfig(**SMALL, **changes, lm_loss="chunked"))
    chunked.load_state_dict(full.state_dict())
    chunked.loss.rows = 7
    return full, chunked


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (3, 12), generator=generator), torch.randint(0, 97, (3, 12), generator=generator)


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True}, {"label_smoothing": 0.1},
                                     {"tie_embeddings": True, "label_smoothing": 0.2, "dropout": 0.0}])
def test_the_loss_and_every_gradient_equal_torchs_cross_entropy(changes):
    full, chunked = pair(**changes)
    idx, targets = batch()
    expected, found = full(idx, targets).loss, chunked(idx, targets).loss
    expected.backward()
    found.backward()
    assert torch.allclose(found, expected, atol=1e-6)
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_a_scaled_loss_scales_the_gradients():
    """Gradient accumulation multiplies each micro-batch's loss by its share: the saved gradients must follow it."""
    full, chunked = pair(tie_embeddings=True)
    idx, targets = batch(2)
    (0.25 * full(idx, targets).loss).backward()
    (0.25 * chunked(idx, targets).loss).backward()
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7), name


def test_under_bf16_autocast_it_stays_within_the_full_paths_rounding():
    """Both project in bf16 and normalise in fp32; they differ by bf16 rounding only, far below the gradient's size."""
    full, chunked = pair(tie_embeddings=True)
    idx, targets = batch(3)
    reference = TransformerLM(full.config)
    reference.load_state_dict(full.state_dict())
    reference(idx, targets).loss.backward()  # fp32: what both approximate
    for model in (full, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets).loss
        loss.backward()
    for (name, r), p, q in zip(reference.named_parameters(), full.parameters(), chunked.parameters()):
        scale = r.grad.abs().max()
        full_error, chunked_error = (p.grad - r.grad).abs().max() / scale, (q.grad - r.grad).abs().max() / scale
        assert q.grad.dtype == torch.float32 and chunked_error < max(2 * full_error, 1e-2), name


def test_evaluation_returns_the_logits_and_training_does_not_hold_them():
    full, chunked = pair()
    idx, targets = batch(4)
    with torch.no_grad():
        a, b = full(idx, targets), chunked(idx, targets)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert chunked(idx, targets).logits is None and isinstance(chunked.loss, ChunkedSoftmaxLoss)
    assert torch.equal(chunked(idx).logits, full(idx).logits)  # no targets: generation's path


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="lm_loss must be one of full, chunked"):
        TransformerConfig(lm_loss="sampled").validate()
