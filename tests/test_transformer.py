"""Model components against independent references: torch ops, formulas, brute-force loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from transformer import (
    Attention,
    AttentionMask,
    LayerNorm,
    NoPositions,
    RMSNorm,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    alibi_slopes,
    count_parameters,
)

V = 50


def small(**changes) -> TransformerConfig:
    return TransformerConfig(vocab_size=V, block_size=16, n_embd=16, n_head=4, n_layer=2, ff_hidden=24, **changes)


def test_layer_norm_matches_torch():
    torch.manual_seed(0)
    norm = LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(3, 5, 16) * 4 + 2
    expected = F.layer_norm(x, (16,), norm.weight, norm.bias, eps=1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 8)
    for row, out in zip(x, norm(x)):
        rms = math.sqrt(sum(v * v for v in row.tolist()) / 8 + 1e-5)
        torch.testing.assert_close(out, row / rms * norm.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_sdpa(causal):
    torch.manual_seed(0)
    config = small()
    attention = Attention(config)
    x = torch.randn(2, 7, 16)
    mask = AttentionMask("full", 8, causal, 16)(0, 7, 7)[None, None]
    key_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    mask = mask & key_mask[:, None, None, :]
    ours, maps = attention(x, mask, NoPositions(config, 16), return_attention=True)
    q, k, v = attention.qkv(x).view(2, 7, 3 * 4, 4).transpose(1, 2).split([4, 4, 4], dim=1)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reference = attention.proj(reference.transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 7))


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(2).tolist() == [2.0 ** -4, 2.0 ** -8]
    # not a power of two: slopes of 4 heads, then every other slope of 8 heads (the paper's code)
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


def test_alibi_bias_is_minus_slope_times_distance():
    config = small(position="alibi")
    model = TransformerLM(config)
    q = torch.zeros(1, 4, 5, 4)
    bias = model.decoder.positions.score_bias(q, torch.zeros(1, 4, 9, 4), start=4)
    slopes = alibi_slopes(4)
    for h in range(4):
        for i in range(5):
            for j in range(9):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * abs(i + 4 - j))


def test_alibi_model_has_no_position_embeddings():
    learned, alibi = TransformerLM(small()), TransformerLM(small(position="alibi"))
    assert count_parameters(learned) - count_parameters(alibi) == 16 * 16  # block_size x n_embd


POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none", "disentangled"]


@pytest.mark.parametrize("position", POSITIONS)
def test_changing_a_later_token_never_changes_earlier_logits(position):
    torch.manual_seed(0)
    model = TransformerLM(small(position=position)).eval()
    idx = torch.randint(2, V, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = torch.randint(2, V, (2, 4))
    with torch.no_grad():
        before, after = model(idx).logits, model(changed).logits
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=0)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_extra_padding_never_changes_the_classifier_output(position, pooling):
    torch.manual_seed(0)
    model = TransformerClassifier(small(position=position, pooling=pooling)).eval()
    tokens = torch.randint(2, V, (3, 6))
    short = F.pad(tokens, (0, 2))  # (3, 8)
    long = F.pad(tokens, (0, 10))  # (3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(short).logits, model(long).logits, rtol=1e-5, atol=1e-6)


def test_mean_pooling_ignores_padding_positions():
    torch.manual_seed(0)
    model = TransformerClassifier(small()).eval()
    h = torch.randn(2, 4, 16)
    key_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pooled = model.pooling(h, key_mask)
    torch.testing.assert_close(pooled[0], h[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], h[1].mean(0))


@pytest.mark.parametrize("model_class,causal", [(TransformerClassifier, False), (TransformerLM, True)])
def test_attention_rows_sum_to_one(model_class, causal):
    torch.manual_seed(0)
    model = model_class(small()).eval()
    with torch.no_grad():
        maps = model(torch.randint(2, V, (2, 10)), return_attention=True).attentions
    assert len(maps) == 2
    for layer in maps:
        assert layer.shape == (2, 4, 10, 10)
        torch.testing.assert_close(layer.sum(-1), torch.ones(2, 4, 10))
        if causal:
            assert torch.triu(layer, diagonal=1).abs().max() == 0


def test_default_parameter_counts_follow_the_formula():
    V, T, C, L, hidden = 5635, 32, 64, 4, 100
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * hidden + hidden + hidden * C + C) + 2 * 2 * C
    trunk = V * C + T * C + L * block + 2 * C
    classifier = trunk + (C * 100 + 100) + (100 * 3 + 3)
    decoder = trunk + C * V + V
    assert count_parameters(TransformerClassifier(TransformerConfig(vocab_size=V))) == classifier
    assert count_parameters(TransformerLM(TransformerConfig(vocab_size=V))) == decoder


@pytest.mark.parametrize("changes,message", [
    ({"n_embd": 65}, "divisible"), ({"n_layer": 0}, "n_layer must be positive"),
    ({"n_kv_heads": 3}, "n_kv_heads"), ({"position": "bogus"}, "position must be one of"),
])
def test_invalid_options_raise_one_line_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**changes).validate()
