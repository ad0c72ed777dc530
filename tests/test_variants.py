"""Architecture variants (part three exploration) against independent references."""

from dataclasses import replace

import pytest
import torch

from studies.exploration import VARIANTS, mask_density
from transformer import (
    MLP,
    AlibiPositions,
    Attention,
    AttentionMask,
    Block,
    ClsPooling,
    DisentangledPositions,
    FactorisedEmbedding,
    LayerNorm,
    LearnedPositions,
    NoPositions,
    PostNormBlock,
    RMSNorm,
    RotaryPositions,
    SinusoidalPositions,
    SwiGLU,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    block_pattern,
    count_parameters,
    local_pattern,
)

V = 40


def small(**changes) -> TransformerConfig:
    sizes = {"vocab_size": V, "block_size": 16, "n_embd": 16, "n_head": 4, "n_layer": 2, "ff_hidden": 24, "window": 4}
    return TransformerConfig(**{**sizes, **changes})


def built(model):
    """The classes a model was built from: its trunk, one block, that block's attention and feedforward."""
    trunk = model.encoder if isinstance(model, TransformerClassifier) else model.decoder
    block = trunk.blocks[0]
    return trunk, block, block.attention, block.feedforward


# what each variant's option must build, checked on the model's modules rather than on its output
BUILT = {
    "base": lambda m, t, b, a, f: isinstance(t.positions, LearnedPositions) and type(b) is Block and isinstance(f, MLP)
    and isinstance(f.net[1], torch.nn.ReLU) and isinstance(b.norm1, LayerNorm) and a.n_kv_heads == a.n_head,
    "sinusoidal": lambda m, t, b, a, f: type(t.positions) is SinusoidalPositions,
    "rope": lambda m, t, b, a, f: type(t.positions) is RotaryPositions,
    "alibi": lambda m, t, b, a, f: type(t.positions) is AlibiPositions,
    "no-position": lambda m, t, b, a, f: type(t.positions) is NoPositions,
    "disentangled": lambda m, t, b, a, f: type(t.positions) is DisentangledPositions,
    "rmsnorm": lambda m, t, b, a, f: isinstance(b.norm1, RMSNorm) and isinstance(t.final_norm, RMSNorm),
    "post-norm": lambda m, t, b, a, f: type(b) is PostNormBlock and isinstance(t.final_norm, torch.nn.Identity),
    "gelu": lambda m, t, b, a, f: isinstance(f, MLP) and isinstance(f.net[1], torch.nn.GELU),
    "swiglu": lambda m, t, b, a, f: isinstance(f, SwiGLU),
    "multi-query": lambda m, t, b, a, f: a.n_kv_heads == 1,
    "local-window": lambda m, t, b, a, f: t.mask.pattern is local_pattern,
    "blockwise": lambda m, t, b, a, f: t.mask.pattern is block_pattern,
    "cls-pooling": lambda m, t, b, a, f: isinstance(m.pooling, ClsPooling),
    "tied-embeddings": lambda m, t, b, a, f: m.lm_head.weight is t.token_embedding.weight,
    "shared-layers": lambda m, t, b, a, f: all(block is b for block in t.blocks) and len(t.blocks) == 2,
    "factorised-embedding": lambda m, t, b, a, f: isinstance(t.token_embedding, FactorisedEmbedding)
    and t.token_embedding.table.embedding_dim == 16,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_its_modules_and_changes_the_output(variant):
    """A variant whose option were silently ignored would build the base model: same modules, same output."""
    assert set(BUILT) == set(VARIANTS)
    changes, tasks = VARIANTS[variant]
    for task in tasks:
        model_class = TransformerClassifier if task == "classifier" else TransformerLM
        torch.manual_seed(0)
        model = model_class(small(n_embd=32, **changes))  # wider than the factorised table (16)
        torch.manual_seed(0)
        base = model_class(small(n_embd=32))
        assert BUILT[variant](model, *built(model))
        idx = torch.randint(2, V, (3, 12), generator=torch.Generator().manual_seed(1))
        targets = torch.randint(0, 3, (3,)) if task == "classifier" else torch.randint(2, V, (3, 12))
        output = model(idx, targets)
        if variant != "base":
            assert not torch.allclose(output.logits, base(idx).logits)
        output.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(output.loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_grouped_query_with_as_many_kv_heads_is_multi_head():
    torch.manual_seed(0)
    mha = TransformerLM(small())
    torch.manual_seed(0)
    gqa = TransformerLM(small(n_kv_heads=4))
    idx = torch.randint(2, V, (2, 10))
    torch.testing.assert_close(mha(idx).logits, gqa(idx).logits, rtol=0, atol=0)


def test_multi_query_equals_multi_head_with_copied_key_value_heads():
    """Brute force: a multi-head layer whose key/value heads are all copies of the single shared head."""
    check_grouped_query_against_multi_head(n_kv_heads=1)


def test_grouped_query_equals_multi_head_with_each_pair_of_query_heads_sharing_one():
    """Two key/value heads for four query heads: query heads 0, 1 use key/value head 0 and heads 2, 3 use head 1
    (h // 2, as Llama's repeat_kv does), not 0, 1, 0, 1."""
    check_grouped_query_against_multi_head(n_kv_heads=2)


def check_grouped_query_against_multi_head(n_kv_heads):
    torch.manual_seed(0)
    config = small(n_kv_heads=n_kv_heads)
    grouped, mha = Attention(config), Attention(small())
    hs, H = 4, 4
    group = H // n_kv_heads
    with torch.no_grad():
        w, b = grouped.qkv.weight, grouped.qkv.bias  # rows: H query heads, then n_kv_heads key heads, then value heads
        q_w, k_w, v_w = w.split([H * hs, n_kv_heads * hs, n_kv_heads * hs])
        q_b, k_b, v_b = b.split([H * hs, n_kv_heads * hs, n_kv_heads * hs])
        # multi-head query head h gets a copy of key/value head h // group, built by a plain loop
        k_rows = torch.cat([k_w[(h // group) * hs : (h // group + 1) * hs] for h in range(H)])
        v_rows = torch.cat([v_w[(h // group) * hs : (h // group + 1) * hs] for h in range(H)])
        k_bias = torch.cat([k_b[(h // group) * hs : (h // group + 1) * hs] for h in range(H)])
        v_bias = torch.cat([v_b[(h // group) * hs : (h // group + 1) * hs] for h in range(H)])
        mha.qkv.weight.copy_(torch.cat([q_w, k_rows, v_rows]))
        mha.qkv.bias.copy_(torch.cat([q_b, k_bias, v_bias]))
        mha.proj.load_state_dict(grouped.proj.state_dict())
    x = torch.randn(2, 6, 16)
    mask = AttentionMask("full", 4, True, 16)(0, 6, 6)[None, None]
    positions = NoPositions(config, 16)
    torch.testing.assert_close(grouped(x, mask, positions)[0], mha(x, mask, positions)[0])
    assert count_parameters(grouped) < count_parameters(mha)


def test_rope_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    rope = RotaryPositions(small(position="rope"), 16)
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)

    def score(i, j):
        return (rope.rotate(q, i) * rope.rotate(k, j)).sum().item()

    for i, j in [(3, 1), (7, 7), (2, 9)]:
        for shift in (1, 5, 40):  # 40 also exercises growing the table past block_size
            assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-4)


def test_rope_keeps_vector_norms():
    rope = RotaryPositions(small(position="rope"), 16)
    x = torch.randn(2, 4, 9, 4)
    torch.testing.assert_close(rope.rotate(x, 3).norm(dim=-1), x.norm(dim=-1))


def brute_force_mask(pattern, w, causal, T):
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if causal and j > i:
                continue
            if pattern == "full":
                allowed[i, j] = True
            elif pattern == "local":
                allowed[i, j] = abs(i - j) < w
            else:  # blockwise: own block; a decoder also sees the whole previous block
                allowed[i, j] = (i // w == j // w) or (causal and j // w == i // w - 1)
    return allowed


@pytest.mark.parametrize("pattern", ["full", "local", "block"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_patterns_match_brute_force(pattern, causal):
    mask = AttentionMask(pattern, 4, causal, 8)
    expected = brute_force_mask(pattern, 4, causal, 20)
    assert torch.equal(mask(0, 20, 20), expected)  # grown past the built length
    assert torch.equal(mask(5, 3, 8), expected[5:8, :8])  # the rows of a cached decoding step


def test_local_window_decoder_sees_only_the_last_w_tokens():
    allowed = AttentionMask("local", 3, True, 8)(0, 8, 8)
    assert allowed[6].nonzero().flatten().tolist() == [4, 5, 6]


def test_mask_density_counts_the_scores():
    assert mask_density("full", 4, False, 8) == 1.0
    # local window 2 on 4 tokens, encoder: rows see 2, 3, 3, 2 of 4 keys
    assert mask_density("local", 2, False, 4) == pytest.approx(10 / 16)
    # blockwise 2 on 4 tokens, decoder: rows see 1, 2, 3, 4 keys, the same as full causal
    assert mask_density("block", 2, True, 4) == 1.0


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "alibi", "none", "disentangled"])
def test_relative_and_fixed_positions_run_past_block_size(position):
    model = TransformerLM(small(position=position)).eval()
    with torch.no_grad():
        logits = model(torch.randint(2, V, (1, 40))).logits
    assert logits.shape == (1, 40, V) and torch.isfinite(logits).all()


def test_learned_positions_refuse_to_run_past_block_size():
    model = TransformerLM(small()).eval()
    with pytest.raises(ValueError, match="learned positions stop at 16"):
        model(torch.randint(2, V, (1, 17)))


def test_swiglu_keeps_parameters_close_to_relu():
    relu = count_parameters(TransformerLM(TransformerConfig(vocab_size=100)))
    swiglu = count_parameters(TransformerLM(TransformerConfig(vocab_size=100, feedforward="swiglu")))
    assert abs(swiglu - relu) / relu < 0.01


def test_tied_embeddings_share_one_matrix():
    untied, tied = TransformerLM(small()), TransformerLM(small(tie_embeddings=True))
    assert tied.lm_head.weight is tied.decoder.token_embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == V * 16


# ---------------------------------------------------------------- ALBERT: shared layers, factorised embeddings


def block_parameters(C: int, F: int) -> int:
    """One pre-norm block with a ReLU MLP, by formula: two LayerNorms, q/k/v and output projections, the MLP."""
    return 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)


def lm_parameters(V: int, T: int, C: int, F: int, L: int, E: int | None = None) -> int:
    """The decoder by formula: token table (factorised: V*E + E*C + C), positions, L blocks, final norm, head."""
    embedding = V * C if E is None else V * E + E * C + C
    return embedding + T * C + L * block_parameters(C, F) + 2 * C + (C * V + V)


@pytest.mark.parametrize(("share", "E"), [(False, None), (True, None), (False, 4), (True, 4)])
def test_albert_parameter_counts_follow_the_formula(share, E):
    config = replace(small(share_layers=share, embedding_dim=E), n_layer=3)
    expected = lm_parameters(V, 16, 16, 24, 1 if share else 3, E)
    assert count_parameters(TransformerLM(config)) == expected


def test_shared_layers_are_one_module_applied_n_layer_times():
    torch.manual_seed(0)
    model = TransformerLM(replace(small(share_layers=True), n_layer=3))
    blocks = model.decoder.blocks
    assert len(blocks) == 3 and blocks[0] is blocks[1] is blocks[2]
    # the same function three times: applying block 0 three times by hand gives the model's hidden states
    idx = torch.randint(2, V, (2, 10))
    trunk = model.decoder
    x = trunk.positions.embed(trunk.token_embedding(idx), 0)
    mask = trunk.mask(0, 10, 10)[None, None]
    for _ in range(3):
        x, _ = blocks[0](x, mask, trunk.positions)
    with torch.no_grad():
        assert torch.allclose(model.lm_head(trunk.final_norm(x)), model(idx).logits, atol=1e-6)


def test_factorised_embedding_is_a_narrow_table_then_a_projection():
    torch.manual_seed(0)
    model = TransformerClassifier(small(embedding_dim=4))
    embedding = model.encoder.token_embedding
    assert embedding.table.weight.shape == (V, 4) and embedding.projection.weight.shape == (16, 4)
    idx = torch.tensor([[5, 7]])
    expected = embedding.table.weight[idx] @ embedding.projection.weight.T + embedding.projection.bias
    assert torch.allclose(embedding(idx), expected)


def test_albert_defaults_leave_the_base_model_unchanged():
    torch.manual_seed(0)
    base = TransformerLM(small())
    torch.manual_seed(0)
    explicit = TransformerLM(small(share_layers=False, embedding_dim=16))  # E = n_embd: no factorisation
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), explicit.state_dict().values(), strict=True))


def test_tied_embeddings_with_a_narrow_table_is_refused():
    with pytest.raises(ValueError, match="tie_embeddings needs the token table n_embd wide"):
        small(embedding_dim=4, tie_embeddings=True).validate()


def test_shared_layers_checkpoint_round_trip(tmp_path):
    import utilities

    torch.manual_seed(0)
    model = TransformerLM(small(share_layers=True, embedding_dim=8))
    utilities.save_checkpoint(tmp_path / "run", model, {**model.config.to_dict(), "model": "lm"}, '{"type": "absent"}', {})
    loaded, _, _ = utilities.build_and_load(tmp_path / "run")
    idx = torch.randint(2, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, model.eval()(idx).logits)
    assert loaded.decoder.blocks[0] is loaded.decoder.blocks[1]
