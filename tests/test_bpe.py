"""The byte-level BPE tokenizer, against hand-worked merges and a naive full-recount reference."""

import json
import random
from collections import Counter

import hypothesis
import pytest
from hypothesis import strategies

from tokenizer import (
    EOS_ID,
    GPT2_PATTERN,
    SPECIALS,
    ByteBPETokenizer,
    WordTokenizer,
    tokenizer_from_json,
)

OFFSET = len(SPECIALS)  # byte b has id b + OFFSET
FIRST_MERGE = OFFSET + 256


def byte_id(char: str) -> int:
    return ord(char) + OFFSET


# --- an independent reference: recount every pair before every merge ---------------------------

def naive_merge(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    out, i = list(word), 0
    while i < len(out) - 1:
        if (out[i], out[i + 1]) == pair:
            out[i : i + 2] = [new_id]  # then step past the new token: occurrences do not overlap
        i += 1
    return tuple(out)


def naive_merges(texts: list[str], num_merges: int) -> list[tuple[int, int]]:
    pieces = Counter(piece for text in texts for piece in GPT2_PATTERN.findall(text))
    words = [(tuple(b + OFFSET for b in piece.encode("utf-8")), count) for piece, count in pieces.items()]
    merges = []
    for new_id in range(FIRST_MERGE, FIRST_MERGE + num_merges):
        counts = Counter()
        for word, count in words:
            for i in range(len(word) - 1):
                counts[word[i], word[i + 1]] += count
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest ids
        merges.append(best)
        words = [(naive_merge(word, best, new_id), count) for word, count in words]
    return merges


def naive_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    ids = []
    for piece in GPT2_PATTERN.findall(text):
        word = tuple(b + OFFSET for b in piece.encode("utf-8"))
        for rank, pair in enumerate(merges):  # every merge, in training order
            word = naive_merge(word, pair, FIRST_MERGE + rank)
        ids.extend(word)
    return ids


@pytest.fixture(scope="module")
def speech_lines(data_dir) -> list[str]:
    return (data_dir / "train_LM.txt").read_text(encoding="utf-8").splitlines()[:300]


@pytest.fixture(scope="module")
def tokenizer(speech_lines) -> ByteBPETokenizer:
    return ByteBPETokenizer.from_texts(speech_lines, vocab_size=700)


# --- hand-worked toy corpus (the Hugging Face course's example) -------------------------------

# Words and counts: hug 10, pug 5, pun 12, bun 4, hugs 5 (one text each, so no leading spaces).
TOY = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
UG, UN, HUG, PUN, PUG, HUGS, BUN = range(FIRST_MERGE, FIRST_MERGE + 7)
TOY_MERGES = [
    # pairs: h u 15, u g 20, p u 17, u n 16, b u 4, g s 5                 -> u+g = 20
    (byte_id("u"), byte_id("g")),
    # h ug 15, p ug 5, p u 12, u n 16, b u 4, ug s 5                      -> u+n = 16
    (byte_id("u"), byte_id("n")),
    # h ug 15, p ug 5, p un 12, b un 4, ug s 5                            -> h+ug = 15
    (byte_id("h"), UG),
    # p ug 5, p un 12, b un 4, hug s 5                                    -> p+un = 12
    (byte_id("p"), UN),
    # p ug 5, b un 4, hug s 5: a tie at 5; (p, ug) = (117, 261) < (hug, s) = (263, 120) -> p+ug
    (byte_id("p"), UG),
    # b un 4, hug s 5                                                     -> hug+s = 5
    (HUG, byte_id("s")),
    # b un 4                                                              -> b+un = 4; then every word is one token
    (byte_id("b"), UN),
]


def test_toy_corpus_learns_the_hand_worked_merges():
    tokenizer = ByteBPETokenizer.from_texts(TOY, vocab_size=1000)
    assert tokenizer.merges == TOY_MERGES
    assert tokenizer.vocab_size == FIRST_MERGE + 7  # the corpus runs out of pairs before 1,000
    assert tokenizer.itos[FIRST_MERGE:] == ["ug", "un", "hug", "pun", "pug", "hugs", "bun"]


def test_toy_corpus_encoding():
    tokenizer = ByteBPETokenizer.from_texts(TOY, vocab_size=1000)
    assert tokenizer.encode("hugs") == [HUGS]
    # u n h u g: u+g (earliest merge) -> u n h ug; u+n -> un h ug; h+ug -> un hug
    assert tokenizer.encode("unhug") == [UN, HUG]
    # "bug" and " hug" are separate pre-tokens; b+ug and space+hug were never learned
    assert tokenizer.encode("bug hug") == [byte_id("b"), UG, byte_id(" "), HUG]
    assert tokenizer.split("bug hug") == ["b", "ug", " ", "hug"]


# --- ties and determinism ------------------------------------------------------------------------

@pytest.mark.parametrize("texts", [["ab", "ba"], ["ba", "ab"]])
def test_tie_goes_to_the_smallest_pair_of_ids(texts):
    # (a, b) and (b, a) both occur once; (a, b) has the smaller ids whatever the input order
    tokenizer = ByteBPETokenizer.from_texts(texts, vocab_size=1000)
    assert tokenizer.merges == [(byte_id("a"), byte_id("b")), (byte_id("b"), byte_id("a"))]


def test_training_is_deterministic_and_order_free(speech_lines):
    first = ByteBPETokenizer.from_texts(speech_lines, vocab_size=400)
    again = ByteBPETokenizer.from_texts(speech_lines, vocab_size=400)
    reversed_order = ByteBPETokenizer.from_texts(speech_lines[::-1], vocab_size=400)
    assert first.merges == again.merges == reversed_order.merges


# --- the key check: incremental counts agree with a full recount per merge ----------------------

def test_incremental_training_matches_naive_recount_on_speech(speech_lines):
    lines = speech_lines[:80]
    tokenizer = ByteBPETokenizer.from_texts(lines, vocab_size=FIRST_MERGE + 200)
    assert tokenizer.merges == naive_merges(lines, 200)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_training_matches_naive_recount_with_many_ties(seed):
    # a two-letter alphabet gives repeated letters (overlapping pairs) and ties at every step; run to exhaustion
    rng = random.Random(seed)
    texts = ["".join(rng.choice("aab") for _ in range(rng.randint(1, 9))) for _ in range(150)]
    tokenizer = ByteBPETokenizer.from_texts(texts, vocab_size=10_000)
    assert tokenizer.merges == naive_merges(texts, 10_000)


def test_encoding_matches_merges_applied_in_training_order(tokenizer, speech_lines):
    text = "\n".join(speech_lines[200:240]) + " Übermäßig naïve 日本 🎉"
    assert tokenizer.encode(text) == naive_encode(text, tokenizer.merges)


# --- round trip ----------------------------------------------------------------------------------

TRICKY = [
    "", " ", "   leading and trailing   ", "x",
    "café naïve Übermäßig", "e\u0301 a\u0308 n\u0303",  # precomposed and combining accents
    "日本語のテキスト 中文 한국어", "🎉👍🏽 👨‍👩‍👧 🇫🇷",  # emoji with skin tone, ZWJ family, flag
    "tab\there\nnew\r\nline\n\n\n", "\x00\x01\x1b[31mred\x1b[0m\x7f", "\u200b\ufeff\u00a0",
    "<eos> <pad> <bos", "'s 've 'll 'd n't", "12345 67.89 -- ...", "\U0010ffff\U0001f600", "a" * 500,
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allow_special=True)) == text


def test_round_trip_random_code_points(tokenizer):
    rng = random.Random(0)
    surrogates = range(0xD800, 0xE000)
    for _ in range(200):
        points = (rng.randrange(0x110000) for _ in range(rng.randint(0, 30)))
        text = "".join(chr(p) for p in points if p not in surrogates)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_property(tokenizer):
    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(strategies.text())  # the default alphabet leaves out lone surrogates
    def check(text):
        assert tokenizer.decode(tokenizer.encode(text)) == text

    check()


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff", "\ud83d\ude00"])
def test_lone_surrogates_raise(tokenizer, text):
    # not valid Unicode text: there are no UTF-8 bytes to tokenize
    with pytest.raises(ValueError):
        tokenizer.encode(text)


def test_decode_tolerates_invalid_byte_sequences(tokenizer):
    first_byte_of_e_acute = "é".encode()[0] + OFFSET
    assert tokenizer.decode([byte_id("a"), first_byte_of_e_acute, byte_id("b")]) == "a\ufffdb"
    assert tokenizer.decode([0xFF + OFFSET]) == "\ufffd"


# --- special tokens ------------------------------------------------------------------------------

def test_special_tokens_are_single_ids_and_never_merged():
    tokenizer = ByteBPETokenizer.from_texts(["hello <eos> world<eos>", "<eos><eos><pad>"] * 20, vocab_size=300)
    assert tokenizer.itos[:OFFSET] == list(SPECIALS)
    assert all(min(pair) >= OFFSET for pair in tokenizer.merges)
    plain = tokenizer.encode("<eos>")
    assert len(plain) > 1 and min(plain) >= OFFSET  # by default a literal "<eos>" is just text
    assert tokenizer.encode("hi<eos>", allow_special=True) == tokenizer.encode("hi") + [EOS_ID]
    assert tokenizer.encode("".join(SPECIALS), allow_special=True) == list(range(OFFSET))
    assert tokenizer.split("<eos", allow_special=True) == tokenizer.split("<eos")
    assert tokenizer.decode(tokenizer.encode("a<mask>b", allow_special=True)) == "a<mask>b"


# --- vocabulary size and JSON --------------------------------------------------------------------

def test_vocab_size_is_exact_when_the_corpus_allows(speech_lines):
    for size in (FIRST_MERGE, FIRST_MERGE + 1, 500):
        tokenizer = ByteBPETokenizer.from_texts(speech_lines, vocab_size=size)
        assert tokenizer.vocab_size == len(tokenizer.itos) == size
    with pytest.raises(ValueError):
        ByteBPETokenizer.from_texts(speech_lines, vocab_size=FIRST_MERGE - 1)


def test_json_round_trip_gives_identical_encodings(tokenizer):
    text = tokenizer.to_json()
    assert json.loads(text)["type"] == "bpe"
    again = ByteBPETokenizer.from_json(text)
    assert again.merges == tokenizer.merges and again.itos == tokenizer.itos
    for sample in TRICKY:
        assert again.encode(sample, allow_special=True) == tokenizer.encode(sample, allow_special=True)


def test_tokenizer_from_json_dispatches_on_type(tokenizer):
    assert isinstance(tokenizer_from_json(tokenizer.to_json()), ByteBPETokenizer)
    words = WordTokenizer.from_texts(["the cat sat"])
    assert tokenizer_from_json(words.to_json()).itos == words.itos
    with pytest.raises(ValueError):
        tokenizer_from_json(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="expected a JSON dict, got list"):
        tokenizer_from_json("[1]")


@pytest.mark.parametrize("merges", [[[0, OFFSET]], [[OFFSET, 10_000]], [[OFFSET, OFFSET], [OFFSET, OFFSET]]])
def test_from_json_rejects_bad_merges(merges):
    with pytest.raises(ValueError):
        ByteBPETokenizer.from_json(json.dumps({"type": "bpe", "specials": list(SPECIALS), "merges": merges}))
