"""Reports: attention sanity checks and heatmaps, training plots, tables, atomic file writes and checkpoints."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from transformer import TransformerClassifier, TransformerConfig, TransformerLM

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


def write_tables(tables: dict[str, str], out: Path, log=print):
    """Print each Markdown table under its name and write it as OUT/NAME.md."""
    for name, table in tables.items():
        log(f"\n{name}\n{table}")
        write_text(out / f"{name}.md", table + "\n")


def pyplot():
    """matplotlib.pyplot on the file-only backend, imported on first use: a run with --no-plots never loads it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    finally:
        pyplot().close(figure)


def save_log_log(figure, axes, xlabel: str, ylabel: str, title: str, path: Path, legend_size: int = 8) -> Path:
    """Finish a plot on log-log axes (labels, a light grid, the legend) and save it as save_figure does."""
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=legend_size)
    figure.tight_layout()
    return save_figure(figure, path)


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



def attention_check(model, tokenizer, text: str, causal: bool, device, heatmap_dir: Path | None, prefix: str) -> list[str]:
    """Run one sentence through the model, check every attention map, save the heatmaps (unless heatmap_dir is None)."""
    block_size = model.config.block_size
    ids = tokenizer.encode(text)[:block_size]
    tokens = [tokenizer.itos[i] for i in ids]
    if not causal:  # pad the encoder's input so the padding mask is exercised too
        ids = ids + [model.config.pad_id] * (block_size - len(ids))
    inputs = torch.tensor([ids])
    with torch.no_grad():
        attentions = model(inputs.to(device), return_attention=True).attentions
    key_mask = inputs != model.config.pad_id if not causal else None
    if not causal and model.pooling.extra_tokens:  # [CLS] pooling puts a token before the text
        key_mask = torch.cat([torch.ones(1, 1, dtype=torch.bool), key_mask], dim=1)
        tokens = ["[CLS]", *tokens]
    failures = check_attention([a.cpu() for a in attentions], causal, key_mask)
    if heatmap_dir is not None:
        save_attention_heatmaps(attentions, tokens, heatmap_dir, prefix)
    return [f"{prefix}: {failure}" for failure in failures]


def save_attention_heatmaps(attentions, tokens: list[str], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per layer and head of the first sequence, tokens on both axes."""
    from PIL import Image  # matplotlib's own PNG writer

    # Every map has the same axes, ticks, labels and colour bar, and drawing those (64 tick labels) is most of the
    # cost: they are drawn once, and each map only redraws its image, spines and title over a copy of that
    # background ("blitting"; a figure of its own per map took ~0.2 s a map, this ~0.03 s).
    n = len(tokens)
    size = 2.5 + 0.22 * n
    figure, axes = pyplot().subplots(figsize=(size, size), dpi=110)
    try:
        image = axes.imshow(torch.zeros(n, n).numpy(), cmap="viridis", vmin=0.0, vmax=1.0, animated=True)
        axes.set_xticks(range(n), tokens, rotation=90, fontsize=7)
        axes.set_yticks(range(n), tokens, fontsize=7)
        axes.set_xlabel("key")
        axes.set_ylabel("query")
        title = axes.set_title(f"{prefix}: layer 1, head 1", animated=True)
        figure.colorbar(image, ax=axes, fraction=0.046)
        figure.tight_layout()
        canvas = figure.canvas
        canvas.draw()  # everything but the animated image and title
        background = canvas.copy_from_bbox(figure.bbox)
        paths = []
        for layer, maps in enumerate(attentions):
            for head in range(maps.shape[1]):
                canvas.restore_region(background)
                image.set_data(maps[0, head].detach().cpu()[:n, :n].numpy())
                title.set_text(f"{prefix}: layer {layer + 1}, head {head + 1}")
                for artist in (image, *axes.spines.values(), title):
                    axes.draw_artist(artist)
                picture = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
                path = Path(out_dir) / f"{prefix}_layer{layer + 1}_head{head + 1}.png"
                paths.append(atomic_write(path, picture.save))
        return paths
    finally:
        pyplot().close(figure)


# ---------------------------------------------------------------- plots


def plot_curves(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str, path: Path,
                log_y: bool = False, log_x: bool = False) -> Path:
    """Line plot of named (x, y) series."""
    figure, axes = pyplot().subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        axes.plot(x, y, marker="o", markersize=3, label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if log_y:
        axes.set_yscale("log")
    if log_x:
        axes.set_xscale("log")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def plot_bars(values: dict[str, float], errors: dict[str, float] | None, ylabel: str, title: str, path: Path,
              limit: float | None = None) -> Path:
    """Horizontal bar plot with optional error bars; with `limit`, bars beyond +-limit are cut there and labelled,
    so that one outlier does not flatten the others."""
    names = list(values)
    shown = [max(-limit, min(limit, values[n])) if limit else values[n] for n in names]
    figure, axes = pyplot().subplots(figsize=(7, 0.9 + 0.35 * len(names)))
    axes.barh(names, shown, xerr=[errors[n] for n in names] if errors else None, capsize=3)
    for row, name in enumerate(names):
        if limit and abs(values[name]) > limit:
            axes.text(shown[row], row, f" {values[name]:+.0f} ", va="center", ha="right" if shown[row] > 0 else "left",
                      color="white", fontsize=9)
    if limit:
        axes.set_xlim(-1.1 * limit, 1.1 * limit)
        axes.axvline(0, color="black", linewidth=0.8)
    axes.invert_yaxis()
    axes.set_xlabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


# ---------------------------------------------------------------- tables


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get two decimals, integers thousands separators."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- checkpoints
# A checkpoint is a directory: model.safetensors (the weights, a tied matrix once), config.json (the TransformerConfig plus
# "model": "classifier" | "lm"), tokenizer.json and metrics.json. It is written into a hidden sibling
# directory and renamed into place, so a reader sees the old checkpoint or the new one, never a mix.

# safetensors: no pickle, and read by the whole ecosystem
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "metrics.json")
CHECKPOINT_MODELS = {"classifier": TransformerClassifier, "lm": TransformerLM}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not rebuild its model; the message names the file."""


def _fsync(path: Path):
    """Flush a file or directory to disk, so a power cut after the rename cannot leave it empty."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _replace_directory(source: Path, target: Path):
    """Rename `source` onto `target`; an existing target is moved aside first and removed after."""
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, aside)  # onto the empty directory mkdtemp just made
    try:
        os.replace(source, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)  # put the previous checkpoint back
        raise
    _fsync(target.parent)
    if aside is not None:
        shutil.rmtree(aside)


def unique_state_dict(model: torch.nn.Module) -> dict:
    """The state_dict without the second name of a tied tensor (safetensors stores each tensor once)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    return unique


def save_checkpoint(directory: Path, model: torch.nn.Module, config_dict: dict, tokenizer_json: str, metrics: dict) -> Path:
    """Write model.safetensors, config.json, tokenizer.json and metrics.json as one directory, atomically."""
    directory = Path(directory)
    if config_dict.get("model") not in CHECKPOINT_MODELS:
        raise ValueError(f"config_dict['model'] must be one of {', '.join(CHECKPOINT_MODELS)}, got {config_dict.get('model')!r}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.new."))
    try:
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in unique_state_dict(model).items()}
        safetensors.torch.save_file(weights, temporary / "model.safetensors", metadata={"format": "pt"})
        (temporary / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        (temporary / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (temporary / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        for name in (*CHECKPOINT_FILES, "."):
            _fsync(temporary / name)
        _replace_directory(temporary, directory)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return directory


def _read_json(path: Path, kind=dict):
    """Parsed JSON of `path`, which must be a `kind`; CheckpointError otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: invalid JSON ({str(error).splitlines()[0]})") from error
    if not isinstance(data, kind):
        raise CheckpointError(f"{path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def _read_weights(path: Path) -> dict:
    """The state_dict in the safetensors file `path`."""
    try:
        state_dict = safetensors.torch.load_file(path, device="cpu")
    except Exception as error:  # truncated or corrupt archives fail in many ways (RuntimeError, EOFError, ...)
        # torch's own text may be long or misleading (a corrupt file is "Weights only load failed")
        raise CheckpointError(f"{path}: unreadable weights, truncated or corrupt ({type(error).__name__})") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    return state_dict


def load_checkpoint(directory: Path) -> tuple[dict, dict, str, dict]:
    """(state_dict, config_dict, tokenizer_json, metrics) of a checkpoint; CheckpointError if any is unusable."""
    directory = Path(directory)
    weights = directory / CHECKPOINT_FILES[0]
    for path in (directory / name for name in CHECKPOINT_FILES):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
    state_dict = _read_weights(weights)
    config_dict = _read_json(directory / "config.json")
    _read_json(directory / "tokenizer.json")  # checked here, parsed by the tokenizer
    tokenizer_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
    return state_dict, config_dict, tokenizer_json, _read_json(directory / "metrics.json")


def _mismatch(expected: dict, found: dict) -> str | None:
    """A one-line description of how state_dict `found` differs from `expected` in keys or shapes, or None."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing or unexpected:
        return f"{len(missing)} missing and {len(unexpected)} unexpected tensors, e.g. {sorted(missing or unexpected)[0]}"
    wrong = [k for k in expected if expected[k].shape != found[k].shape]
    if wrong:
        k = wrong[0]
        shapes = f"{tuple(found[k].shape)}, config needs {tuple(expected[k].shape)}"
        return f"{len(wrong)} tensors of the wrong shape, e.g. {k}: {shapes}"
    return None


def build_and_load(directory: Path) -> tuple[torch.nn.Module, str, dict]:
    """(model in eval mode, tokenizer_json, metrics) rebuilt from a checkpoint; CheckpointError if it cannot be."""
    directory = Path(directory)
    state_dict, config_dict, tokenizer_json, metrics = load_checkpoint(directory)
    options = dict(config_dict)
    kind = options.pop("model", None)
    config_path = directory / "config.json"
    if kind not in CHECKPOINT_MODELS:
        raise CheckpointError(f"{config_path}: 'model' must be one of {', '.join(CHECKPOINT_MODELS)}, got {kind!r}")
    try:
        model = CHECKPOINT_MODELS[kind](TransformerConfig(**options))
    except (TypeError, ValueError) as error:  # unknown option, or a value validate() rejects
        raise CheckpointError(f"{config_path}: cannot build the model ({error})") from error
    # model.safetensors holds a tied matrix under its first name only
    weights = directory / CHECKPOINT_FILES[0]
    problem = _mismatch(unique_state_dict(model), state_dict)
    if problem:
        raise CheckpointError(f"{weights}: does not match config.json: {problem}")
    model.load_state_dict(state_dict, strict=False)  # the keys were checked above; a tied name shares its tensor
    return model.eval(), tokenizer_json, metrics
