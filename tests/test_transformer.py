"""Model components against independent references: torch ops, formulas, brute-force loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from transformer import (
    AlibiPositions,
    Attention,
    AttentionMask,
    DisentangledPositions,
    LayerNorm,
    NoPositions,
    RMSNorm,
    RotaryPositions,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    alibi_slopes,
    count_parameters,
    sinusoid_table,
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


# ---------------------------------------------------------------- position schemes against their formulas


def test_sinusoid_table_matches_the_formula():
    length, dim = 12, 10
    table = sinusoid_table(length, dim)
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_disentangled_bias_matches_an_i_j_loop_with_clipping():
    torch.manual_seed(0)
    config = small(position="disentangled", relative_clip=2)
    positions = DisentangledPositions(config, 16)
    hs, H, k = 4, 4, 2
    key_table = positions.key_table.detach().view(2 * k + 1, H, hs)  # (2k+1, H, hs): head h's part of each row
    query_table = positions.query_table.detach().view(2 * k + 1, H, hs)
    q, keys = torch.randn(2, H, 3, hs), torch.randn(2, H, 7, hs)
    start = 4  # three queries at positions 4, 5, 6 over keys 0..6, as a cached decoding step sees them
    with torch.no_grad():
        bias = positions.score_bias(q, keys, start)
    for b in range(2):
        for h in range(H):
            for row in range(3):
                i = start + row
                for j in range(7):
                    query_to_key = max(-k, min(k, i - j)) + k  # DeBERTa's delta(i, j)
                    key_to_query = max(-k, min(k, j - i)) + k  # delta(j, i)
                    expected = (q[b, h, row] @ key_table[query_to_key, h]
                                + keys[b, h, j] @ query_table[key_to_query, h]) / math.sqrt(hs)
                    assert bias[b, h, row, j].item() == pytest.approx(expected.item(), abs=1e-6)


def rotate_by_hand(x, start):
    """Rotate each pair (2m, 2m+1) of the last dimension of x (B, H, T, hs) at position p by p * 10000^(-2m/hs)."""
    rotated = x.clone()
    hs = x.shape[-1]
    for t in range(x.shape[2]):
        for m in range(hs // 2):
            angle = (start + t) * 10000 ** (-2 * m / hs)
            even, odd = x[..., t, 2 * m], x[..., t, 2 * m + 1]
            rotated[..., t, 2 * m] = even * math.cos(angle) - odd * math.sin(angle)
            rotated[..., t, 2 * m + 1] = even * math.sin(angle) + odd * math.cos(angle)
    return rotated


def split_heads(attention, x):
    B, T, _ = x.shape
    return attention.qkv(x).view(B, T, 3 * 4, 4).transpose(1, 2).split([4, 4, 4], dim=1)  # (B, H, T, hs) x3


def merge_heads(attention, y):
    B, _, T, _ = y.shape
    return attention.proj(y.transpose(1, 2).reshape(B, T, 16))


def test_rope_attention_rotates_queries_and_keys():
    torch.manual_seed(0)
    config = small(position="rope")
    attention = Attention(config)
    x = torch.randn(2, 6, 16)
    mask = AttentionMask("full", 8, True, 16)(0, 6, 6)[None, None]
    with torch.no_grad():
        ours, _ = attention(x, mask, RotaryPositions(config, 16))
        q, k, v = split_heads(attention, x)
        reference = F.scaled_dot_product_attention(rotate_by_hand(q, 0), rotate_by_hand(k, 0), v, attn_mask=mask)
    torch.testing.assert_close(ours, merge_heads(attention, reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_attention_adds_its_bias_unscaled(causal):
    torch.manual_seed(0)
    config = small(position="alibi")
    attention = Attention(config)
    x = torch.randn(2, 6, 16)
    mask = AttentionMask("full", 8, causal, 16)(0, 6, 6)
    slopes = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])  # four heads: 2^(-8h/4)
    distance = torch.tensor([[abs(i - j) for j in range(6)] for i in range(6)], dtype=torch.float32)
    float_mask = (-slopes[:, None, None] * distance).masked_fill(~mask, float("-inf"))  # (H, T, T)
    with torch.no_grad():
        ours, _ = attention(x, mask[None, None], AlibiPositions(config, 16))
        q, k, v = split_heads(attention, x)
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask)  # adds the mask to q.k / sqrt(hs)
    torch.testing.assert_close(ours, merge_heads(attention, reference), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("changes", [{}, {"attention_pattern": "local", "window": 3},
                                     {"attention_pattern": "block", "window": 3}, {"norm_placement": "post"}],
                         ids=["full", "local", "block", "post-norm"])
def test_each_row_of_a_ragged_batch_equals_its_unpadded_self(changes):
    torch.manual_seed(0)
    model = TransformerClassifier(small(**changes)).eval()
    lengths = [2, 5, 9, 12]
    rows = [torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    batch = torch.stack([F.pad(row, (0, 12 - len(row))) for row in rows])  # (4, 12), right-padded with 0
    with torch.no_grad():
        batched = model(batch).logits
        for index, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched[index], alone, rtol=1e-5, atol=1e-6)
