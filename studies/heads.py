"""Head analysis: what each attention head of a trained encoder or decoder attends to, over the test set.

Per layer and head, averaged over every real (non-padding) query of the test data: the attention weight on the
previous token, on the token itself, on the first token, on punctuation; the mean distance |i - j| weighted by
attention; and the entropy of the attention row (nats; log(n) is uniform over n keys). It reads the four
models of part three's comparison (learned positions and ALiBi, decoder and encoder) and changes none of them.
"""

import unicodedata

import torch

import training
import utilities
from studies.study import Context, Study

STATISTICS = ("previous", "same", "first", "punctuation", "distance", "entropy")


def punctuation_table(itos: list[str]) -> torch.Tensor:
    """(V,) True for tokens made only of punctuation characters (spaces around them aside)."""
    def punctuation(token):
        stripped = token.strip()
        return bool(stripped) and all(unicodedata.category(char).startswith("P") for char in stripped)
    return torch.tensor([punctuation(token) for token in itos])


def layer_sums(attention: torch.Tensor, real: torch.Tensor, punctuation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over real queries of each statistic per head, and how many queries each sum has.

    attention: (B, H, T, T) one layer's maps; real, punctuation: (B, T) booleans over the tokens.
    Returns (len(STATISTICS), H) sums and (len(STATISTICS),) counts; `previous` skips each sequence's first query.
    """
    B, H, T, _ = attention.shape
    index = torch.arange(T, device=attention.device)
    previous = torch.cat([attention.new_zeros(B, H, 1), attention.diagonal(offset=-1, dim1=-2, dim2=-1)], dim=-1)  # (B, H, T)
    distance = (index[:, None] - index[None, :]).abs().to(attention.dtype)  # (T, T)
    per_query = torch.stack([
        previous,
        attention.diagonal(dim1=-2, dim2=-1),  # (B, H, T)
        attention[..., 0],
        (attention * punctuation[:, None, None, :]).sum(-1),
        (attention * distance).sum(-1),
        -(attention * attention.clamp_min(1e-12).log()).sum(-1),
    ])  # (S, B, H, T)
    queries = real[None].expand(len(STATISTICS), B, T).clone()  # (S, B, T)
    queries[0, :, 0] = False  # the first token has no previous token
    sums = (per_query * queries[:, :, None, :]).sum(dim=(1, 3))  # (S, H)
    return sums, queries.sum(dim=(1, 2)).to(attention.dtype)


def analyse(model, batches, punctuation: torch.Tensor, pad_id: int | None, device) -> dict:
    """Mean of each statistic per layer and head over all batches of (B, T) ids: {statistic: [[per head] per layer]}."""
    totals, counts = None, None
    model.eval()
    extra_tokens = model.pooling.extra_tokens if hasattr(model, "pooling") else 0  # a decoder has no pooling
    with torch.no_grad():
        for ids in batches:
            real = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
            attentions = model(ids.to(device), return_attention=True).attentions
            if extra_tokens:  # [CLS] pooling puts a token before the text
                real = torch.cat([real.new_ones(ids.shape[0], 1), real], dim=1)
                ids = torch.cat([ids.new_full((ids.shape[0], 1), -1), ids], dim=1)
            is_punctuation = punctuation[ids.clamp_min(0)] & (ids >= 0)
            sums = [layer_sums(a.cpu(), real, is_punctuation) for a in attentions]
            layer_totals = torch.stack([s for s, _ in sums])  # (L, S, H)
            totals = layer_totals if totals is None else totals + layer_totals
            counts = sums[0][1] if counts is None else counts + sums[0][1]
    means = totals / counts[None, :, None]  # (L, S, H)
    return {name: means[:, n].tolist() for n, name in enumerate(STATISTICS)}


def encoder_heads(run, model) -> dict:
    """The head statistics of a trained classifier over test_CLS.tsv."""
    ids, _ = training.classifier_tensors(run, run.data.test_cls, model.config.block_size)
    return analyse(model, ids.split(256), punctuation_table(run.tokenizer.itos), model.config.pad_id, run.device)


def decoder_heads(run, model) -> dict:
    """The head statistics of a trained decoder over the three test speeches, in windows of block_size tokens."""
    T = model.config.block_size
    windows = [stream[: len(stream) // T * T].view(-1, T) for stream in
               (training.encode_stream(run, text) for text in run.data.test_lm.values())]
    return analyse(model, torch.cat(windows).split(256), punctuation_table(run.tokenizer.itos), None, run.device)


def heads_table(statistics: dict) -> str:
    """One markdown row per layer and head."""
    rows = [[f"{layer + 1}.{head + 1}", *(statistics[name][layer][head] for name in STATISTICS)]
            for layer in range(len(statistics["same"])) for head in range(len(statistics["same"][0]))]
    return utilities.markdown_table(["layer.head", "previous", "same", "first", "punctuation", "mean distance",
                                     "entropy (nats)"], rows)


def summary_table(models: dict[str, dict]) -> str:
    """One markdown row per model: each statistic averaged over its heads."""
    def mean(values):
        flat = [v for layer in values for v in layer]
        return sum(flat) / len(flat)
    rows = [[name, *(mean(statistics[key]) for key in STATISTICS)] for name, statistics in models.items()]
    return utilities.markdown_table(["model (mean over heads)", "previous", "same", "first", "punctuation",
                                     "mean distance", "entropy (nats)"], rows)


def plot_heads(models: dict[str, dict], path):
    """A grid of (layer x head) heatmaps: one row per model, one column per statistic, values written in."""
    figure, axes = utilities.pyplot().subplots(len(models), len(STATISTICS), figsize=(2.6 * len(STATISTICS), 2.2 * len(models)),
                                squeeze=False)
    for row, (model_name, statistics) in enumerate(models.items()):
        for column, name in enumerate(STATISTICS):
            values = torch.tensor(statistics[name]).numpy()  # (L, H)
            share = name not in ("distance", "entropy")
            ax = axes[row, column]
            ax.imshow(values, cmap="viridis", vmin=0.0 if share else None, vmax=1.0 if share else None, aspect="auto")
            for layer in range(values.shape[0]):
                for head in range(values.shape[1]):
                    ax.text(head, layer, f"{values[layer, head]:.2f}", ha="center", va="center", fontsize=7, color="white")
            ax.set_xticks(range(values.shape[1]), [str(h + 1) for h in range(values.shape[1])])
            ax.set_yticks(range(values.shape[0]), [str(layer + 1) for layer in range(values.shape[0])])
            ax.set_title(name if row == 0 else "", fontsize=9)
            if column == 0:
                ax.set_ylabel(f"{model_name}\nlayer", fontsize=8)
            if row == len(models) - 1:
                ax.set_xlabel("head")
    figure.tight_layout()
    return utilities.save_figure(figure, path)


def measure(run: training.Run, context: Context) -> tuple[dict, list[str]]:
    """The head statistics of each of the comparison's models (test set)."""
    statistics = {}
    for name, model in context.models.items():
        statistics[name] = (decoder_heads if name.startswith("decoder") else encoder_heads)(run, model)
    return statistics, []


def tables(statistics: dict) -> dict[str, str]:
    """One file (heads.md): the mean over heads of every model, then each model's layer-by-head table."""
    sections = [f"## {name}\n\n{heads_table(values)}" for name, values in statistics.items()]
    return {"heads": "\n\n".join([f"## mean over heads\n\n{summary_table(statistics)}", *sections])}


STUDY = Study("heads", "heads", "heads (test set)",
              "also measure what each head attends to, learned positions vs ALiBi (studies/heads.py)",
              measure, tables, lambda statistics, out: plot_heads(statistics, out / "heads.png"))
