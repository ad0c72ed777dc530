"""Sanity checks catch what they should; writes are atomic."""

import json

import numpy
import pytest
import torch

import utilities
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


def draw_heatmap_whole(matrix, tokens, title, path):
    """The heatmap drawn the plain way, a figure of its own drawn whole by savefig: the reference for the blitted ones."""
    plt = utilities.pyplot()
    n = len(tokens)
    figure, axes = plt.subplots(figsize=(2.5 + 0.22 * n,) * 2, dpi=110)
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(n), tokens, rotation=90, fontsize=7)
    axes.set_yticks(range(n), tokens, fontsize=7)
    axes.set_xlabel("key")
    axes.set_ylabel("query")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    utilities.save_figure(figure, path)


def pixels(path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(numpy.asarray(Image.open(path).convert("RGB"), dtype="int16"))  # (H, W, 3)


def differing(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of pixels whose colour differs by more than 8 levels in some channel."""
    return (a - b).abs().amax(-1).gt(8).float().mean().item()


def test_each_heatmap_shows_its_own_map_as_a_whole_drawing_would(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = ["the", "nation", "is", "strong", "<pad>", "again"]
    maps = [torch.rand(1, 2, 6, 6, generator=generator).softmax(-1) for _ in range(2)]  # 2 layers x 2 heads
    paths = utilities.save_attention_heatmaps(maps, tokens, tmp_path, "test")
    assert [p.name for p in paths] == [f"test_layer{layer}_head{head}.png" for layer in (1, 2) for head in (1, 2)]
    references = []
    for index in range(len(paths)):
        layer, head = divmod(index, 2)
        references.append(tmp_path / f"reference_{index}.png")
        draw_heatmap_whole(maps[layer][0, head].numpy(), tokens, f"test: layer {layer + 1}, head {head + 1}", references[-1])
    drawn, whole = [pixels(path) for path in paths], [pixels(path) for path in references]
    for index, picture in enumerate(drawn):
        assert picture.shape == whole[index].shape
        # the same picture but for the anti-aliased spines, which the blitted map redraws over its image (~0.6%)
        assert differing(picture, whole[index]) < 0.01
        assert differing(picture, whole[(index + 1) % len(paths)]) > 0.1  # another head's map is not it
