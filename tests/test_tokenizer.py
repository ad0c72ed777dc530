"""The word tokenizer: NLTK Treebank conventions inside Punkt sentences, offline."""

import pytest

from tokenizer import PAD_ID, UNK_ID, WordTokenizer


@pytest.mark.parametrize("text,expected", [
    # hand-tokenized with the Penn Treebank conventions nltk.word_tokenize follows
    ('Mr. Smith said "I can\'t go." Then he left.',
     ["Mr.", "Smith", "said", "``", "I", "ca", "n't", "go", ".", "''", "Then", "he", "left", "."]),
    ("The U.S. economy grew 3.5% in Jan. and we're proud.",
     ["The", "U.S.", "economy", "grew", "3.5", "%", "in", "Jan.", "and", "we", "'re", "proud", "."]),
    ("It's the people's choice -- not Washington's.",
     ["It", "'s", "the", "people", "'s", "choice", "--", "not", "Washington", "'s", "."]),
    ("Dr. King dreamed; we won't forget (ever)!",
     ["Dr.", "King", "dreamed", ";", "we", "wo", "n't", "forget", "(", "ever", ")", "!"]),
])
def test_split_follows_treebank_conventions(text, expected):
    assert WordTokenizer().split(text) == expected


def test_sentence_final_period_is_split_but_abbreviations_are_kept():
    words = WordTokenizer().split("I met Gen. Powell. He agreed.")
    assert words == ["I", "met", "Gen.", "Powell", ".", "He", "agreed", "."]


def test_vocabulary_reserves_pad_and_unk():
    tokenizer = WordTokenizer.from_texts(["the cat sat", "the dog"])
    assert tokenizer.itos[:2] == ["<pad>", "<unk>"]
    assert tokenizer.vocab_size == 2 + 4
    ids = tokenizer.encode("the zebra sat")
    assert ids[1] == UNK_ID and PAD_ID not in ids
    assert tokenizer.decode(ids) == "the <unk> sat"


def test_json_round_trip_keeps_ids():
    tokenizer = WordTokenizer.from_texts(["Four score and seven years ago."])
    again = WordTokenizer.from_json(tokenizer.to_json())
    assert again.itos == tokenizer.itos
    assert again.encode("seven years") == tokenizer.encode("seven years")
