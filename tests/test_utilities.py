"""Sanity checks catch what they should; writes are atomic."""

import json

import pytest
import torch

from utilities import atomic_write, check_attention, markdown_table, write_json


def uniform_causal(T):
    maps = torch.tril(torch.ones(T, T))
    return (maps / maps.sum(-1, keepdim=True))[None, None]  # (1, 1, T, T)


def test_good_maps_pass():
    assert check_attention([uniform_causal(5)], causal=True) == []


def test_each_kind_of_failure_is_reported_with_its_place():
    bad_rows = uniform_causal(4) * 1.1
    assert "rows sum to 1" in check_attention([bad_rows], causal=True)[0]
    leak = torch.full((1, 1, 4, 4), 0.25)
    failures = check_attention([uniform_causal(4), leak], causal=True)
    assert len(failures) == 1 and "layer 2 head 1" in failures[0] and "above the diagonal" in failures[0]
    key_mask = torch.tensor([[True, True, True, False]])
    failures = check_attention([leak], causal=False, key_mask=key_mask)
    assert len(failures) == 1 and "padded keys" in failures[0]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "result.json", {"accuracy": 80})

    def crash(temporary):
        with open(temporary, "w") as handle:
            handle.write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"accuracy": 80}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind


def test_markdown_table_formats_floats_and_integers():
    table = markdown_table(["name", "count", "score", "flag"], [["a", 1234567, 0.5, True]])
    assert table.splitlines() == ["| name | count | score | flag |", "|---|---|---|---|", "| a | 1,234,567 | 0.50 | True |"]
