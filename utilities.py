"""Reports: attention sanity checks and heatmaps, training plots, tables and atomic file writes."""

import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt
import torch

# ---------------------------------------------------------------- atomic output


def atomic_write(path: Path, write) -> Path:
    """Call write(temporary_path), then rename it onto `path`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write text atomically."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json(path: Path, data) -> Path:
    """Write indented JSON atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    finally:
        plt.close(figure)


# ---------------------------------------------------------------- attention sanity checks


def check_attention(attentions, causal: bool, key_mask=None, tolerance: float = 1e-5) -> list[str]:
    """Check every map of every layer and head; return one message per failed check (empty: all pass).

    attentions: per layer (B, H, T, Tk). Rows must sum to 1; a causal map must be zero above the
    diagonal; padded key columns (key_mask False) must get zero weight from every real query.
    """
    failures = []
    for layer, maps in enumerate(attentions):
        B, H, T, T_k = maps.shape
        real = torch.ones(B, T_k, dtype=torch.bool) if key_mask is None else key_mask.cpu()
        real_queries = real[:, T_k - T:]  # (B, T)
        for b in range(B):
            for h in range(H):
                where = f"layer {layer + 1} head {h + 1} sentence {b + 1}"
                rows = maps[b, h][real_queries[b]]  # (T_real, Tk)
                error = (rows.sum(-1) - 1).abs().max().item()
                if error > tolerance:
                    failures.append(f"{where}: rows sum to 1 +- {error:.2e}, over tolerance {tolerance:.0e}")
                if causal:
                    above = torch.triu(maps[b, h], diagonal=T_k - T + 1).abs().max().item()
                    if above > 0:
                        failures.append(f"{where}: weight {above:.2e} above the diagonal of a causal map")
                padded = rows[:, ~real[b]]
                if padded.numel() and padded.abs().max().item() > 0:
                    failures.append(f"{where}: padded keys get weight {padded.abs().max().item():.2e}")
    return failures


def save_attention_heatmaps(attentions, tokens: list[str], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per layer and head of the first sequence, tokens on both axes."""
    paths = []
    for layer, maps in enumerate(attentions):
        for head in range(maps.shape[1]):
            matrix = maps[0, head].detach().cpu()[: len(tokens), : len(tokens)].numpy()
            size = 2.5 + 0.22 * len(tokens)
            figure, axes = plt.subplots(figsize=(size, size))
            image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
            axes.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
            axes.set_yticks(range(len(tokens)), tokens, fontsize=7)
            axes.set_xlabel("key")
            axes.set_ylabel("query")
            axes.set_title(f"{prefix}: layer {layer + 1}, head {head + 1}")
            figure.colorbar(image, ax=axes, fraction=0.046)
            figure.tight_layout()
            paths.append(save_figure(figure, Path(out_dir) / f"{prefix}_layer{layer + 1}_head{head + 1}.png"))
    return paths


# ---------------------------------------------------------------- plots


def plot_curves(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str, path: Path,
                log_y: bool = False) -> Path:
    """Line plot of named (x, y) series."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        axes.plot(x, y, marker="o", markersize=3, label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if log_y:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def plot_bars(values: dict[str, float], errors: dict[str, float] | None, ylabel: str, title: str, path: Path) -> Path:
    """Horizontal bar plot with optional error bars."""
    names = list(values)
    figure, axes = plt.subplots(figsize=(7, 0.9 + 0.35 * len(names)))
    axes.barh(names, [values[n] for n in names], xerr=[errors[n] for n in names] if errors else None, capsize=3)
    axes.invert_yaxis()
    axes.set_xlabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


# ---------------------------------------------------------------- tables


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get two decimals."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
