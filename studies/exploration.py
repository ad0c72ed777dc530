"""The exploration: every architecture variant one switch away from the course's base model, on both tasks.

Each (variant, task, seed) is one training run in studies/workers.py's pool; the tables give the mean and spread
over seeds, the fraction of attention scores each pattern computes, and the decoders' length extrapolation.
"""

import statistics
import time
from pathlib import Path

import utilities
from dataset import TEST_LM
from studies.study import Context, Option, Study
from studies.workers import Job, cell, run_jobs, spread
from training import Run
from transformer import AttentionMask, TransformerConfig

# name -> (config changes from the base model, tasks it applies to). One change per row.
VARIANTS = {
    "base": ({}, ("classifier", "lm")),
    "sinusoidal": ({"position": "sinusoidal"}, ("classifier", "lm")),
    "rope": ({"position": "rope"}, ("classifier", "lm")),
    "alibi": ({"position": "alibi"}, ("classifier", "lm")),
    "no-position": ({"position": "none"}, ("classifier", "lm")),
    "disentangled": ({"position": "disentangled"}, ("classifier", "lm")),
    "rmsnorm": ({"norm": "rms"}, ("classifier", "lm")),
    "post-norm": ({"norm_placement": "post"}, ("classifier", "lm")),
    "gelu": ({"feedforward": "gelu"}, ("classifier", "lm")),
    "swiglu": ({"feedforward": "swiglu"}, ("classifier", "lm")),
    "multi-query": ({"n_kv_heads": 1}, ("classifier", "lm")),
    "local-window": ({"attention_pattern": "local"}, ("classifier", "lm")),
    "blockwise": ({"attention_pattern": "block"}, ("classifier", "lm")),
    "cls-pooling": ({"pooling": "cls"}, ("classifier",)),
    "tied-embeddings": ({"tie_embeddings": True}, ("lm",)),
    "shared-layers": ({"share_layers": True}, ("classifier", "lm")),  # ALBERT
    "factorised-embedding": ({"embedding_dim": 16}, ("classifier", "lm")),  # ALBERT, E = n_embd / 4
}
EXTRAPOLATION_LENGTHS = (32, 64, 128)
EXTRAPOLATING = ("sinusoidal", "rope", "alibi", "no-position", "disentangled")  # learned positions stop at 32
HEATMAP_VARIANTS = ("base", "local-window", "blockwise")  # the three attention patterns, to see the masks
PATTERN_ROWS = HEATMAP_VARIANTS  # rows that report the fraction of attention scores computed


def mask_density(pattern: str, window: int, causal: bool, block_size: int) -> float:
    """Fraction of the attention scores a pattern computes, relative to full (causal) attention."""
    allowed = AttentionMask(pattern, window, causal, block_size).allowed
    full = AttentionMask("full", window, causal, block_size).allowed
    return allowed.sum().item() / full.sum().item()


# ---------------------------------------------------------------- summarising


def summarise(task: str, runs: list[dict]) -> dict:
    """Mean and spread over seeds of one variant's runs."""
    summary = {"num_parameters": runs[0]["num_parameters"],
               "train_seconds": spread([r["train_seconds"] for r in runs])}
    if task == "classifier":
        for key in ("test_accuracy", "test_accuracy_unseen"):
            summary[key] = spread([r[key] for r in runs])
        return summary
    summary["train_perplexity"] = spread([r["train_perplexity"] for r in runs])
    summary["perplexity"] = {name: spread([r["perplexity"][name] for r in runs]) for name in runs[0]["perplexity"]}
    if "extrapolation" in runs[0]:
        summary["extrapolation"] = {length: {name: spread([r["extrapolation"][length][name] for r in runs])
                                             for name in runs[0]["extrapolation"][length]}
                                    for length in runs[0]["extrapolation"]}
    return summary


def exploration_tables(results: dict) -> dict[str, str]:
    """Markdown tables: one per task, plus length extrapolation."""
    tables, densities = {}, results["attention_density"]
    rows = [[name, r["num_parameters"], f"{r['train_seconds']['mean']:.1f}", cell(r["test_accuracy"]),
             cell(r["test_accuracy_unseen"]), f"{densities[name]['classifier']:.0%}" if name in densities else ""]
            for name, r in results["classifier"].items()]
    tables["classifier"] = utilities.markdown_table(
        ["variant", "parameters", "train s", "test acc %", "unseen acc %", "scores computed"], rows)
    rows = [[name, r["num_parameters"], f"{r['train_seconds']['mean']:.1f}", cell(r["train_perplexity"]),
             *(cell(r["perplexity"][n]) for n in TEST_LM),
             f"{densities[name]['lm']:.0%}" if name in densities else ""]
            for name, r in results["lm"].items()]
    tables["lm"] = utilities.markdown_table(
        ["variant", "parameters", "train s", "train ppl", *TEST_LM, "scores computed"], rows)
    rows = [[name] + [" / ".join(f"{r['extrapolation'][length][n]['mean']:.1f}" for n in TEST_LM)
                      if "extrapolation" in r else "n/a (positions stop at 32)" for length in EXTRAPOLATION_LENGTHS]
            for name, r in results["lm"].items() if name == "base" or "extrapolation" in r]
    tables["extrapolation"] = utilities.markdown_table(
        ["decoder (trained on 32)"] + [f"ppl obama / wbush / hbush @ {n}" for n in EXTRAPOLATION_LENGTHS], rows)
    return tables


def _axis_limit(values: list[float]) -> float:
    """An axis half-width that shows the typical values: outliers (over 5x the median size) are left to be cut."""
    sizes = sorted(abs(v) for v in values)
    typical = [v for v in sizes if v <= 5 * sizes[len(sizes) // 2]] or sizes
    return 1.2 * max(max(typical), 1e-9)


def plot_exploration(results: dict, out: Path):
    """Bars of each variant's change from the base model per task, and perplexity against evaluation length."""
    classifier = results["classifier"]
    base = classifier["base"]["test_accuracy"]["mean"]
    change = {n: r["test_accuracy"]["mean"] - base for n, r in classifier.items()}
    spread = {n: r["test_accuracy"]["std"] for n, r in classifier.items()}
    utilities.plot_bars(change, spread, "test accuracy minus the base model's (points; bars: std over seeds)",
                        "Exploration: classifier", out / "explore_classifier.png",
                        limit=_axis_limit([abs(change[n]) + spread[n] for n in change]))
    lm = results["lm"]
    mean_ppl = {n: statistics.mean(p["mean"] for p in r["perplexity"].values()) for n, r in lm.items()}
    change = {n: 100 * (value / mean_ppl["base"] - 1) for n, value in mean_ppl.items()}
    utilities.plot_bars(change, None, "change of the mean test perplexity from the base model's (%; lower is better)",
                        "Exploration: decoder", out / "explore_lm.png", limit=_axis_limit(list(change.values())))
    series = {n: (list(EXTRAPOLATION_LENGTHS), [statistics.mean(v["mean"] for v in r["extrapolation"][k].values())
                                                for k in EXTRAPOLATION_LENGTHS])
              for n, r in lm.items() if "extrapolation" in r}
    utilities.plot_curves(series, "evaluation context (tokens); trained on 32", "mean test perplexity",
                          "Length extrapolation", out / "explore_extrapolation.png", log_y=True)


# ---------------------------------------------------------------- the exploration


def variant_names(text: str | None) -> list[str]:
    """--variants "a,b" as a list (every variant when None); ValueError for a name not in VARIANTS."""
    variants = text.split(",") if text else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return variants


def explore(run: Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """Train every (task, variant, seed) in worker processes; return per-variant summaries and check failures."""
    settings, seeds = run.settings, context.seeds
    variants = variant_names(context.options["variants"])
    variants = ["base"] + [v for v in variants if v != "base"]  # every variant is compared with the base model
    jobs = [Job(task, variant, context.seed + offset, VARIANTS[variant][0], settings.preset,
                heatmap=offset == 0 and variant in HEATMAP_VARIANTS and settings.plots,
                extrapolate=EXTRAPOLATION_LENGTHS if task == "lm" and variant in EXTRAPOLATING else ())
            for variant in variants for task in VARIANTS[variant][1] for offset in range(seeds)]
    log(f"exploration: {len(jobs)} training runs ({len(variants)} variants x {seeds} seeds) on {context.workers} workers")
    started = time.perf_counter()
    runs, failures = run_jobs(settings, jobs, context.workers, log)
    results = {"classifier": {}, "lm": {}}
    for (task, variant), reports in runs.items():
        results[task][variant] = summarise(task, reports)
    window = TransformerConfig().window
    block_size = settings.model_flags.get("block_size") or TransformerConfig().block_size
    results["attention_density"] = {
        v: {task: mask_density(VARIANTS[v][0].get("attention_pattern", "full"), window, task == "lm", block_size)
            for task in ("classifier", "lm")} for v in variants if v in PATTERN_ROWS}
    results["seconds"] = time.perf_counter() - started
    results["seeds"] = seeds
    return results, failures


STUDY = Study("explore", "exploration", "exploration", "also compare every architecture variant (--seeds seeds each)",
              explore, lambda results: {f"explore_{name}": table for name, table in exploration_tables(results).items()},
              plot_exploration,
              options=(Option("variants", str, None, f"comma-separated subset of: {', '.join(VARIANTS)} (base always runs)"),),
              check=lambda options: variant_names(options["variants"]))
