"""Data reading and batching, against brute-force references."""

import torch

from dataset import consecutive_windows, random_windows, read_labelled_segments


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
