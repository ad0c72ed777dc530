"""The attention path through torch's F.scaled_dot_product_attention against the manual one: the same outputs within
float rounding, with padding masks, causal masks, position biases, grouped keys and cached decoding; and the weights
that the checks and heatmaps read still come from the manual path."""

import pytest
import torch

from transformer import FusedAttention, TransformerClassifier, TransformerConfig, TransformerLM

SMALL = dict(vocab_size=50, block_size=16, n_embd=32, n_head=4, n_layer=2, ff_hidden=48)


def pair(model_class, **changes):
    """The same weights behind the manual and the fused attention."""
    torch.manual_seed(0)
    manual = model_class(TransformerConfig(**SMALL, **changes)).eval()
    fused = model_class(TransformerConfig(**SMALL, **changes, attention="sdpa")).eval()
    fused.load_state_dict(manual.state_dict())
    return manual, fused


@pytest.mark.parametrize("changes", [{}, {"position": "alibi"}, {"position": "rope"}, {"position": "disentangled"},
                                     {"n_kv_heads": 2}, {"attention_pattern": "local", "window": 4}])
def test_the_decoder_gives_the_same_logits_and_loss(changes):
    manual, fused = pair(TransformerLM, **changes)
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    a, b = manual(idx, idx), fused(idx, idx)
    assert isinstance(fused.decoder.blocks[0].attention, FusedAttention)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.loss, b.loss, atol=1e-6)


@pytest.mark.parametrize("changes", [{}, {"pooling": "cls"}, {"attention_pattern": "local", "window": 2},
                                     {"attention_pattern": "block", "window": 4}])
def test_the_encoder_gives_the_same_logits_with_padding(changes):
    """Padding keys are masked; with a local window some padding queries see no key at all and must stay finite."""
    manual, fused = pair(TransformerClassifier, **changes)
    idx = torch.randint(1, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    idx[0, 5:], idx[1, 12:], idx[3, 1:] = 0, 0, 0  # pad_id 0: rows of 5, 12, 16 and 1 real tokens
    a, b = manual(idx).logits, fused(idx).logits
    assert torch.isfinite(b).all() and torch.allclose(a, b, atol=1e-5)


def test_the_gradients_agree():
    manual, fused = pair(TransformerLM, position="alibi")
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    manual.train()(idx, idx).loss.backward()
    fused.train()(idx, idx).loss.backward()
    for (name, p), q in zip(manual.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_cached_decoding_gives_the_same_logits_step_by_step():
    manual, fused = pair(TransformerLM, position="rope")
    idx = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(4))
    caches = {"manual": manual.new_caches(), "fused": fused.new_caches()}
    for t in range(10):  # one token at a time through the KV cache, against the whole prefix without one
        step = {name: model(idx[:, t:t + 1], caches=caches[name]).logits[:, -1]
                for name, model in (("manual", manual), ("fused", fused))}
        full = manual(idx[:, :t + 1]).logits[:, -1]
        assert torch.allclose(step["fused"], step["manual"], atol=1e-5) and torch.allclose(step["fused"], full, atol=1e-5)


def test_asking_for_the_weights_takes_the_manual_path():
    manual, fused = pair(TransformerLM)
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(5))
    weights = [w for w in fused(idx, return_attention=True).attentions]
    reference = manual(idx, return_attention=True).attentions
    assert len(weights) == 2 and all(torch.equal(w, r) for w, r in zip(weights, reference))
    assert fused(idx).attentions is None


def test_an_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention must be one of manual, sdpa"):
        TransformerConfig(attention="flash").validate()
