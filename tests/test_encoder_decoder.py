"""The T5-style encoder-decoder: cached decoding against recomputation, causality, what cross-attention sees,
and span corruption against its definition."""

import pytest
import torch

from models.encoder_decoder import EncoderDecoder
from models.generation import generate
from studies import span_corruption as seq2seq
from transformer import TransformerConfig

V, PAD = 30, 0


def model(**changes) -> EncoderDecoder:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=V, block_size=16, n_embd=16, n_head=4, n_layer=2, ff_hidden=24, **changes)
    return EncoderDecoder(config).eval()


SOURCE = [5, 9, 3, 7, 11, 2, 8]


@pytest.mark.parametrize("changes", [{}, {"position": "rope", "n_kv_heads": 2}])
def test_cached_decoding_equals_recomputation(changes):
    conditioned = model(**changes).conditioned_on(SOURCE)
    target = torch.tensor([[1, 4, 6, 8, 10, 12]])
    with torch.no_grad():
        full = conditioned(target).logits  # (1, T, V), no cache
        caches = conditioned.new_caches()
        steps = [conditioned(target[:, t : t + 1], caches=caches).logits for t in range(target.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    for strategy in ("greedy", "beam"):
        cached = generate(conditioned, [1], 10, strategy, beams=3)
        assert cached == generate(conditioned, [1], 10, strategy, beams=3, use_cache=False)


def test_source_keys_and_values_are_computed_once_per_layer():
    encoder_decoder = model()
    calls = []
    for block in encoder_decoder.blocks:
        block.cross_attention.key_value.register_forward_hook(lambda *_: calls.append(1))
    conditioned = encoder_decoder.conditioned_on(SOURCE)
    generate(conditioned, [1], 8, "greedy")
    assert len(calls) == 2  # once per layer, not once per step
    calls.clear()
    generate(conditioned, [1], 8, "greedy", use_cache=False)
    assert len(calls) == 2 * 8


def test_decoder_self_attention_is_causal():
    encoder_decoder = model()
    source = torch.tensor([SOURCE])
    target = torch.tensor([[1, 4, 6, 8, 10, 12]])
    changed = target.clone()
    changed[0, 3] = 20
    with torch.no_grad():
        before = encoder_decoder((source, target)).logits
        after = encoder_decoder((source, changed)).logits
    assert torch.equal(before[:, :3], after[:, :3])  # positions before the change do not see it
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_cross_attention_sees_every_source_token_and_no_padding():
    encoder_decoder = model()
    source = torch.tensor([SOURCE + [PAD] * 4])  # 7 real tokens, 4 padding
    target = torch.tensor([[1, 4, 6]])
    with torch.no_grad():
        output = encoder_decoder((source, target), return_attention=True)
        for _, cross in output.attentions:  # (B, H, T, S) per layer
            assert torch.equal(cross[..., 7:], torch.zeros_like(cross[..., 7:]))
            assert (cross[..., :7] > 0).all()
        unpadded = encoder_decoder((torch.tensor([SOURCE]), target)).logits
        assert torch.allclose(output.logits, unpadded, atol=1e-6)  # padding changes nothing
        for position in range(len(SOURCE)):  # every real source token reaches even the first target position
            changed = source.clone()
            changed[0, position] = 29
            assert not torch.allclose(encoder_decoder((changed, target)).logits[:, 0], output.logits[:, 0])


def test_span_corruption_follows_its_definition():
    extra = seq2seq.ExtraIds(vocab_size=100, sentinels=8)
    tokens = list(range(10, 42))  # 32 distinct tokens
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        source, target = seq2seq.span_corrupt(tokens, extra, generator)
        noise, spans = seq2seq.span_counts(len(tokens))
        assert (noise, spans) == (5, 2)  # round(0.15 * 32) tokens in round(5 / 3) spans
        assert target[-1] == extra.eos and len(target) == noise + spans + 1
        assert [t for t in source if t >= 100] == [extra.sentinel(k) for k in range(spans)]
        assert source[0] < 100  # a kept stretch comes first
        spans_of = {}  # put the spans back in place of their sentinels: the original text
        for token in target[:-1]:
            if token >= 100:
                current = spans_of.setdefault(token, [])
            else:
                current.append(token)
        rebuilt = [t for s in source for t in (spans_of[s] if s >= 100 else [s])]
        assert rebuilt == tokens and all(spans_of.values())
