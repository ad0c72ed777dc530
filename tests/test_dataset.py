"""Data reading and batching, against brute-force references."""

from dataclasses import replace

import torch

from dataset import (
    LabelledSegments,
    consecutive_windows,
    random_windows,
    read_labelled_segments,
    speaker_blocks,
    split_lines,
    stratified_split,
)


def test_consecutive_windows_predict_every_token_once():
    for length in (2, 9, 10, 11, 33):
        data = torch.arange(length)
        targets = torch.cat([y.flatten() for _, y in consecutive_windows(data, 4)])
        assert targets.tolist() == list(range(1, length))  # every token after the first, once, in order
        for x, y in consecutive_windows(data, 4):
            assert torch.equal(y, x + 1)  # each target is the token after its input


def test_random_windows_are_shifted_by_one():
    data = torch.arange(100)
    generator = torch.Generator().manual_seed(0)
    x, y = random_windows(data, 8, 5, generator)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)


def test_empty_segments_are_skipped_and_counted(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("0\thello there\n1\t \n2\tgood night\n\n", encoding="utf-8")
    segments = read_labelled_segments(path)
    assert segments.texts == ["hello there", "good night"]
    assert segments.labels == [0, 2]
    assert segments.skipped_empty == 1


def test_stratified_split_keeps_class_proportions_and_is_deterministic():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    kept, held_out = stratified_split(labels, 0.1, seed=0)
    assert sorted(kept.tolist() + held_out.tolist()) == list(range(100))
    assert [sum(labels[i] == c for i in held_out.tolist()) for c in range(3)] == [5, 3, 2]
    again = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(again[1], held_out)


def test_split_lines_holds_out_the_last_lines():
    text = "".join(f"line {i}\n" for i in range(20))
    train, validation = split_lines(text, 0.1)
    assert train + validation == text
    assert validation == "line 18\nline 19\n"
    assert split_lines(text, 0.0) == (text, "")


def test_speaker_blocks_label_the_lines_between_two_segments_of_one_speaker(tiny_speeches):
    segments = LabelledSegments(["A one.", "A three.", "B five.", "B seven.", "V nine.", "A eleven."], [0, 0, 2, 2, 2, 0])
    lines = ["x zero.", "A one.", "x two.", "A three.", "x four.", "B five.", "x six.", "B seven.", "x eight.",
             "V nine.", "x ten.", "A eleven.", "x twelve."]
    speeches = replace(tiny_speeches, train_cls=segments, train_lm="\n".join(lines) + "\n")
    # by hand: 0-1-2-3 is A's block from line 1, 5-6-7-8-9 B's; 4 and 10 sit between two speakers, 0 and 12 outside
    assert speaker_blocks(speeches) == [("A one.", 0), ("x two.", 0), ("A three.", 0), ("B five.", 2), ("x six.", 2),
                                        ("B seven.", 2), ("x eight.", 2), ("V nine.", 2), ("A eleven.", 0)]
    # without the segment "V nine." (a validation segment): its line is left out, and "x eight." loses the B after it
    assert speaker_blocks(speeches, [0, 1, 2, 3, 5]) == [("A one.", 0), ("x two.", 0), ("A three.", 0), ("B five.", 2),
                                                          ("x six.", 2), ("B seven.", 2), ("A eleven.", 0)]
