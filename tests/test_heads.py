"""Head analysis against hand-computed statistics of hand-made attention maps."""

import json
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import main
from studies import heads
from studies import span_corruption as seq2seq

# one sequence of 3 tokens (the middle one punctuation), two heads:
# head 1 looks at the previous token (the first token at itself), head 2 spreads evenly over the causal keys
PREVIOUS = [[1, 0, 0], [1, 0, 0], [0, 1, 0]]
UNIFORM = [[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]]
EXPECTED = {  # statistic: (head 1, head 2), each the mean over the 3 queries (previous: over queries 2 and 3)
    "previous": (1.0, (1 / 2 + 1 / 3) / 2),
    "same": (1 / 3, (1 + 1 / 2 + 1 / 3) / 3),
    "first": (2 / 3, (1 + 1 / 2 + 1 / 3) / 3),
    "punctuation": (1 / 3, (0 + 1 / 2 + 1 / 3) / 3),
    "distance": ((0 + 1 + 1) / 3, (0 + 1 / 2 + (2 + 1 + 0) / 3) / 3),
    "entropy": (0.0, (0 + math.log(2) + math.log(3)) / 3),
}


class StubModel(torch.nn.Module):
    """Returns fixed attention maps, whatever the ids: the statistics alone are under test."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, ids, return_attention=False):
        return SimpleNamespace(attentions=[self.maps.expand(ids.shape[0], -1, -1, -1)])


def test_statistics_of_a_hand_made_map():
    maps = torch.tensor([PREVIOUS, UNIFORM])[None]  # (1, 2, 3, 3)
    punctuation = torch.tensor([False, True, False, False])  # ids 0..3; id 1 is punctuation
    statistics = heads.analyse(StubModel(maps), [torch.tensor([[2, 1, 3]])], punctuation, None, "cpu")
    for name, expected in EXPECTED.items():
        assert statistics[name][0] == pytest.approx(list(expected), abs=1e-6), name


def test_padding_queries_are_left_out():
    maps = torch.tensor([PREVIOUS, UNIFORM])[None]
    garbage = torch.rand(1, 2, 1, 3)
    padded = torch.cat([torch.cat([maps, garbage], dim=2), torch.zeros(1, 2, 4, 1)], dim=3)  # a 4th, padded token
    padded[:, :, 3, 3] = 0.5
    punctuation = torch.tensor([False, True, False, False])
    statistics = heads.analyse(StubModel(padded), [torch.tensor([[2, 1, 3, 0]])], punctuation, 0, "cpu")
    for name, expected in EXPECTED.items():
        assert statistics[name][0] == pytest.approx(list(expected), abs=1e-6), name


def test_punctuation_table():
    table = heads.punctuation_table(["<pad>", " ,", "...", "word", " ", "--", "'s", "U.S."])
    assert table.tolist() == [False, True, True, False, False, True, False, False]


def test_heatmap_grid_is_written(tmp_path):
    statistics = {name: [[0.1, 0.2], [0.3, 0.4]] for name in heads.STATISTICS}
    path = heads.plot_heads({"a": statistics, "b": statistics}, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_part_three_heads_and_t5_write_their_reports(small_data, tmp_path, capsys, monkeypatch):
    """One part-three run for both flags (the ALiBi comparison it starts with is trained once)."""
    monkeypatch.setattr(seq2seq, "train_span_corruption", partial(seq2seq.train_span_corruption, decode_windows=3))
    status = main.main(["--part", "three", "--data-dir", str(small_data), "--out", str(tmp_path), "--heads", "--t5",
                        "--no-plots", "--epochs", "1", "--max-iters", "10", "--eval-interval", "10"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "== heads (test set)" in out
    result = json.loads((tmp_path / "part_three.json").read_text())
    statistics = result["heads"]
    assert set(statistics) == {"decoder absolute", "decoder alibi", "encoder absolute", "encoder alibi"}
    for values in statistics.values():
        assert len(values["entropy"]) == 4 and len(values["entropy"][0]) == 2  # 4 layers x 2 heads
        shares = torch.tensor([values[name] for name in ("previous", "same", "first", "punctuation")])
        assert ((shares >= 0) & (shares <= 1 + 1e-6)).all()
    decoder = torch.tensor(statistics["decoder absolute"]["first"])
    assert (decoder > 0).all()  # a causal first query sees only the first token
    assert (tmp_path / "heads.md").read_text().count("## ") == 5
    t5 = result["t5"]
    assert set(t5["target_perplexity"]) == {"obama", "wbush", "hbush"}
    assert all(1 < value < float("inf") for value in t5["target_perplexity"].values())
    assert set(t5["decoding_accuracy"]) == {"greedy", "beam"} and "target perplexity" in out
