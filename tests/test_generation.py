"""Generation against independent references: full recomputation, brute force over a toy model, hand-computed filters."""

import itertools
import math

import pytest
import torch

from models.generation import ContextWindow, filter_logits, generate
from transformer import POSITIONS, Output, TransformerConfig, TransformerLM

V = 30


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine the threads' waiting costs 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes) -> TransformerLM:
    torch.manual_seed(0)
    options = {"vocab_size": V, "block_size": 8, "n_embd": 16, "n_head": 4, "n_layer": 2, "ff_hidden": 24, **changes}
    return TransformerLM(TransformerConfig(**options)).eval()


CACHE_CASES = [{"position": position} for position in POSITIONS] + [
    {"n_kv_heads": 1},
    {"n_kv_heads": 2, "position": "rope"},
    {"attention_pattern": "local", "window": 3},
    {"attention_pattern": "block", "window": 3, "position": "alibi"},
    {"norm_placement": "post", "norm": "rms", "feedforward": "swiglu", "tie_embeddings": True},
]
# schemes that may see past block_size: the tables grow; max_context 13 crops at a size no buffer was built for
LONG_CASES = [{"position": position} for position in POSITIONS if position != "learned"]
CASE_IDS = [",".join(f"{k}={v}" for k, v in case.items()) for case in CACHE_CASES]


def check_cached_logits(model, max_context, steps):
    """Grow two random sequences a token at a time; the cached logits must match a full forward pass
    over the last max_context tokens at every step, past the point where the window starts to slide."""
    tokens = torch.randint(0, V, (2, 3 + steps), generator=torch.Generator().manual_seed(1))
    window = ContextWindow(model, max_context)
    with torch.no_grad():
        for T in range(3, tokens.shape[1] + 1):
            cached = window.logits(tokens[:, :T])
            assert window.caches[0].length == min(T, max_context)  # one new token per step until the window slides
            full = model(tokens[:, max(0, T - max_context) : T]).logits[:, -1]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CACHE_CASES, ids=CASE_IDS)
def test_cached_logits_match_full_recompute(case):
    check_cached_logits(tiny(**case), max_context=8, steps=14)


@pytest.mark.parametrize("case", CACHE_CASES, ids=CASE_IDS)
def test_greedy_with_cache_equals_without(case):
    model = tiny(**case)
    with_cache = generate(model, [3, 1, 4], 14, use_cache=True)
    assert len(with_cache) == 14
    assert with_cache == generate(model, [3, 1, 4], 14, use_cache=False)


@pytest.mark.parametrize("case", LONG_CASES, ids=[case["position"] for case in LONG_CASES])
def test_cache_past_block_size(case):
    model = tiny(**case)
    check_cached_logits(model, max_context=13, steps=16)
    assert generate(model, [3, 1, 4], 16, max_context=13) == generate(model, [3, 1, 4], 16, max_context=13, use_cache=False)


@pytest.mark.parametrize("case", CACHE_CASES, ids=CASE_IDS)
def test_beam_search_with_cache_equals_without(case, monkeypatch):
    """Three beams on a real model, so ContextWindow.select must reorder and drop cached rows as beams branch
    and end; 3 + 14 tokens outgrow the window of 8, so it also slides."""
    model = tiny(**case)
    prompt = [3, 1, 4]
    with torch.no_grad():  # the end token: the second likeliest first token, so one of the three first beams ends
        eos_id = model(torch.tensor([prompt])).logits[0, -1].topk(2).indices[1].item()
    kept = []
    real_select = ContextWindow.select
    monkeypatch.setattr(ContextWindow, "select", lambda self, rows: (kept.append(len(rows)), real_select(self, rows))[1])
    with_cache = generate(model, prompt, 14, strategy="beam", beams=3, eos_id=eos_id)
    assert kept[0] == 2 and max(kept) == 3  # a beam ended at the first step; later steps had three again
    assert with_cache == generate(model, prompt, 14, strategy="beam", beams=3, eos_id=eos_id, use_cache=False)
    without_eos = generate(model, prompt, 14, strategy="beam", beams=3)
    assert len(without_eos) == 14
    assert without_eos == generate(model, prompt, 14, strategy="beam", beams=3, use_cache=False)


def test_long_prompt_is_cropped_to_the_window():
    model = tiny()
    prompt = list(range(1, 21))
    assert generate(model, prompt, 5) == generate(model, prompt[-8:], 5)


def test_generate_restores_training_mode():
    model = tiny(dropout=0.5).train()
    assert generate(model, [1, 2], 4) == generate(model, [1, 2], 4, use_cache=False)
    assert model.training


# ---------------------------------------------------------------- beam search on a toy bigram model


class BigramStub(TransformerLM):
    """A 'language model' whose next-token distribution depends on the last token only: row t of PROBS."""

    PROBS = torch.tensor([
        [0.02, 0.55, 0.35, 0.04, 0.04],  # after 0, the prompt: 1 is likelier than 2 ...
        [0.10, 0.10, 0.10, 0.40, 0.30],  # ... but after 1 nothing is likely (best 0.55 * 0.40 = 0.22)
        [0.05, 0.05, 0.05, 0.05, 0.80],  # while after 2, token 4 almost surely follows (0.35 * 0.80 = 0.28)
        [0.30, 0.10, 0.25, 0.15, 0.20],
        [0.03, 0.04, 0.06, 0.07, 0.80],  # no ties for the best tokens: greedy and beam never depend on tie-breaking
    ])

    def __init__(self):
        super().__init__(TransformerConfig(vocab_size=5, block_size=8, n_embd=4, n_head=1, n_layer=1, ff_hidden=4))

    def forward(self, idx, targets=None, caches=None, return_attention=False):
        return Output(self.PROBS.log()[idx], None, None)  # (B, T, V)


def log_prob(sequence, previous=0):
    """log P(sequence | previous) under the stub, by hand."""
    pairs = zip([previous, *sequence], sequence)
    return sum(math.log(BigramStub.PROBS[a, b].item()) for a, b in pairs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_finds_the_likelier_sequence_greedy_misses(use_cache):
    model = BigramStub()
    greedy = generate(model, [0], 2, use_cache=use_cache)
    beam = generate(model, [0], 2, strategy="beam", beams=2, use_cache=use_cache)
    assert greedy == [1, 3]
    assert beam == [2, 4]
    assert log_prob(beam) > log_prob(greedy)
    assert math.isclose(log_prob(beam), math.log(0.35 * 0.80), rel_tol=1e-6)
    assert math.isclose(log_prob(greedy), math.log(0.55 * 0.40), rel_tol=1e-6)
    best = max(itertools.product(range(5), repeat=2), key=log_prob)  # brute force over every continuation
    assert beam == list(best)


def test_one_beam_is_greedy():
    model = BigramStub()
    assert generate(model, [0], 5, strategy="beam", beams=1) == generate(model, [0], 5)


def best_by_brute_force(eos_id, length, alpha):
    """The continuation with the best log-prob / length**alpha among all that end at eos_id or at `length`."""
    candidates = [sequence for n in range(1, length + 1) for sequence in itertools.product(range(5), repeat=n)
                  if (sequence[-1] == eos_id or n == length) and eos_id not in sequence[:-1]]
    return list(max(candidates, key=lambda sequence: log_prob(sequence) / len(sequence) ** alpha))


def test_beam_stops_at_eos_and_normalises_by_length():
    model = BigramStub()
    # eos 3: [1, 3] ends early with the best sum (log .55 + log .4 = -1.51), while [2, 4, 4, 4] has the
    # best mean log-prob (-1.72 / 4 = -0.43); length normalisation (alpha 1, the default) prefers the latter
    assert generate(model, [0], 4, strategy="beam", beams=3, eos_id=3, length_alpha=0.0) == [1, 3]
    assert generate(model, [0], 4, strategy="beam", beams=3, eos_id=3) == [2, 4, 4, 4]
    for eos_id, alpha in itertools.product([3, 4], [0.0, 1.0]):
        found = generate(model, [0], 4, strategy="beam", beams=3, eos_id=eos_id, length_alpha=alpha)
        assert found == best_by_brute_force(eos_id, 4, alpha)


def test_greedy_stops_at_eos_and_suppressed_tokens_never_appear():
    model = BigramStub()
    assert generate(model, [2], 5, eos_id=4) == [4]
    assert generate(model, [0], 2, suppress_ids=[1]) == [2, 4]


# ---------------------------------------------------------------- sampling


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny(position="rope")
    greedy = generate(model, [5, 6], 12)
    assert generate(model, [5, 6], 12, strategy="top-k", top_k=1, generator=torch.Generator().manual_seed(0)) == greedy
    assert generate(model, [5, 6], 12, strategy="top-p", top_p=1e-6, generator=torch.Generator().manual_seed(0)) == greedy


def test_sampling_is_reproducible_with_a_generator():
    model = tiny()
    runs = [generate(model, [5, 6], 20, strategy="sample", temperature=1.5, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


class UnigramStub(TransformerLM):
    """Every next-token distribution is PROBS, whatever came before."""

    PROBS = torch.tensor([0.05, 0.40, 0.30, 0.15, 0.10])

    def __init__(self):
        super().__init__(TransformerConfig(vocab_size=5, block_size=8, n_embd=4, n_head=1, n_layer=1, ff_hidden=4))

    def forward(self, idx, targets=None, caches=None, return_attention=False):
        return Output(self.PROBS.log().expand(*idx.shape, 5), None, None)  # (B, T, V)


@pytest.mark.parametrize(("options", "expected"), [
    ({"strategy": "sample"}, [0.05, 0.40, 0.30, 0.15, 0.10]),
    ({"strategy": "sample", "temperature": 2.0}, [p ** 0.5 for p in (0.05, 0.40, 0.30, 0.15, 0.10)]),
    ({"strategy": "top-k", "top_k": 3}, [0, 0.40, 0.30, 0.15, 0]),
    ({"strategy": "top-p", "top_p": 0.6}, [0, 0.40, 0.30, 0, 0]),  # 0.40 < 0.6, 0.40 + 0.30 >= 0.6
    ({"strategy": "top-p", "top_p": 0.75, "top_k": 2}, [0, 0.40, 0.30, 0, 0]),  # top-k cuts first
], ids=["sample", "temperature-2", "top-k-3", "top-p-0.6", "top-k-2-and-top-p"])
def test_sampled_frequencies_follow_the_renormalised_probabilities(options, expected):
    tokens = generate(UnigramStub(), [1], 2000, generator=torch.Generator().manual_seed(0), **options)
    expected = torch.tensor(expected) / sum(expected)
    frequencies = torch.bincount(torch.tensor(tokens), minlength=5) / len(tokens)
    assert frequencies[expected == 0].sum() == 0  # a filtered token is never drawn
    torch.testing.assert_close(frequencies, expected, atol=0.035, rtol=0)  # over 3 standard errors at 2000 draws


def test_filter_logits_by_hand():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.10]).log()
    inf = float("-inf")
    # top-k 3 drops the least likely; top-p 0.7 keeps 0.5 + 0.25 (0.5 alone is under 0.7)
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0]).log()
    torch.testing.assert_close(filter_logits(logits, top_k=3), expected)
    kept = filter_logits(logits, top_p=0.7)
    assert kept[2:].tolist() == [inf, inf]
    torch.testing.assert_close(kept[:2].softmax(-1), torch.tensor([2 / 3, 1 / 3]))
    # exactly 0.5 is reached by the first token alone; top_p 1 keeps everything
    assert filter_logits(logits, top_p=0.5).isfinite().tolist() == [True, False, False, False]
    torch.testing.assert_close(filter_logits(logits, top_p=1.0), logits)
    # temperature 2 halves the logits: probabilities become sqrt(p) renormalised
    expected = torch.tensor([0.5, 0.25, 0.15, 0.10]).sqrt()
    torch.testing.assert_close(filter_logits(logits, temperature=2.0).softmax(-1), expected / expected.sum())
    # the filters work row by row on a batch, and ties at the k-th logit are kept
    batch = torch.tensor([[3.0, 1.0, 1.0, 0.0], [0.0, 2.0, 5.0, 1.0]])
    assert filter_logits(batch, top_k=2).isfinite().tolist() == [[True, True, True, False], [False, True, True, False]]


def test_greedy_ignores_temperature():
    model = tiny()
    assert generate(model, [1], 3, temperature=0.0) == generate(model, [1], 3)


def test_zero_new_tokens():
    model = tiny()
    assert generate(model, [1], 0) == []
    assert generate(model, [1], 0, strategy="beam") == []


@pytest.mark.parametrize(("arguments", "message"), [
    ({"prompt_ids": []}, "prompt_ids must hold at least one token"),
    ({"prompt_ids": [1, V]}, rf"prompt ids must be in \[0, {V}\), got \[1, {V}\]"),
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1"),
    ({"strategy": "nucleus"}, "strategy must be one of greedy, sample, top-k, top-p, beam, got 'nucleus'"),
    ({"strategy": "sample", "temperature": 0.0}, "temperature must be positive, got 0.0"),
    ({"strategy": "beam", "temperature": -1.0}, "temperature must be positive, got -1.0"),
    ({"strategy": "top-k", "top_k": 0}, "top_k must be at least 1, got 0"),
    ({"strategy": "top-p", "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"strategy": "top-p", "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"strategy": "top-k"}, "strategy 'top-k' needs top_k"),
    ({"strategy": "top-p"}, "strategy 'top-p' needs top_p"),
    ({"strategy": "beam", "beams": 0}, "beams must be at least 1, got 0"),
    ({"max_context": 0}, "max_context must be positive, got 0"),
    ({"max_context": 9}, r"learned positions stop at block_size \(8\), so max_context 9 needs another position scheme"),
])
def test_bad_arguments(arguments, message):
    arguments = {"prompt_ids": [1, 2], "max_new_tokens": 3, **arguments}
    with pytest.raises(ValueError, match=f"^{message}$"):
        generate(tiny(), **arguments)
