"""Where the decoder loses to the Kneser–Ney trigram: the per-token NLL gap by how often the target word
occurs in train_LM.txt, and the rows that close part of it (novel-word mass, a learned novel-word class).

Both models score exactly the same targets: every token of a test file after the first (training.perplexity's
targets; KneserNeyTrigram.target_probabilities with first_target=1). Each target falls in one bucket:
`<unk>`, in the vocabulary but never in train_LM.txt, 1-2, 3-9 or 10+ occurrences. A bucket's contribution to the
gap is its share of the targets times the difference of the mean NLLs in it; the contributions add up to the
difference of the overall mean NLLs, the log of the perplexity ratio.

    python main.py --part three --gap ...            the study: trains the best preset's decoders, seed --seed
    python main.py gap --checkpoint DIR [--data-dir DIR] [--out DIR]    the gap table of a saved decoder
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

import training
import utilities
from dataset import TEST_LM, TRAIN_LM, input_noise, split_lines
from models import averaging
from models import novel_words as novel
from studies import baselines
from studies.baselines import KneserNeyTrigram
from studies.study import Context, Study
from tokenizer import UNK_ID

BUCKETS = ("<unk>", "never in train_LM.txt", "1-2", "3-9", "10+")
LOWER_BOUNDS = (1, 3, 10)  # counts at which the "1-2", "3-9" and "10+" buckets start
TESTS = tuple(TEST_LM)


def bucket_of_ids(counts: torch.Tensor) -> torch.Tensor:
    """(V,) bucket index of each vocabulary id, from its count in the training text (BUCKETS' order)."""
    buckets = 1 + torch.bucketize(counts, torch.tensor(LOWER_BOUNDS), right=True)  # 0 -> 1, 1-2 -> 2, ...
    buckets[UNK_ID] = 0
    return buckets


def target_nlls(model, stream: torch.Tensor, block_size: int, device) -> torch.Tensor:
    """-log P of every token after the first, in training.perplexity's consecutive windows: (len(stream) - 1,)."""
    pieces = [F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").cpu()
              for logits, targets in training.scored_windows(model, stream, block_size, device, batch_size=128)]
    return torch.cat(pieces).double()


def count_model_nlls(model, stream) -> torch.Tensor:
    """-log P of every token after the first under a count model (KneserNeyTrigram or NovelMassKneserNey)."""
    return -torch.tensor(model.target_probabilities(stream), dtype=torch.float64).log()


def gap_rows(target_buckets: torch.Tensor, decoder_nll: torch.Tensor, count_nll: torch.Tensor) -> list[dict]:
    """Per bucket: share of the targets, mean NLL of each model, share x (decoder - count model); then the total."""
    if not len(target_buckets) == len(decoder_nll) == len(count_nll):
        raise ValueError(f"the models scored different targets: {len(decoder_nll)} and {len(count_nll)} of "
                         f"{len(target_buckets)}")
    rows = []
    for index, name in enumerate(BUCKETS):
        where = target_buckets == index
        share = where.double().mean().item()
        decoder, count = (decoder_nll[where].mean().item(), count_nll[where].mean().item()) if where.any() else (math.nan,) * 2
        rows.append({"bucket": name, "targets": int(where.sum()), "share": share, "decoder_nll": decoder,
                     "count_model_nll": count, "contribution": share * (decoder - count) if where.any() else 0.0})
    rows.append({"bucket": "all", "targets": len(target_buckets), "share": 1.0, "decoder_nll": decoder_nll.mean().item(),
                 "count_model_nll": count_nll.mean().item(),
                 "contribution": (decoder_nll.mean() - count_nll.mean()).item()})
    return rows


def gap_table(rows: list[dict], decoder: str, count_model: str) -> str:
    """One comparison's rows as Markdown."""
    return utilities.markdown_table(
        ["targets", "count", "share", f"{decoder} NLL", f"{count_model} NLL", "share × difference"],
        [[r["bucket"], r["targets"], f"{100 * r['share']:.1f}%", f"{r['decoder_nll']:.2f}", f"{r['count_model_nll']:.2f}",
          f"{r['contribution']:+.3f}"] for r in rows])


def plot_gap(comparisons: dict, path):
    """Grouped bars: each bucket's contribution to the gap, per test file, one panel per comparison."""
    import matplotlib.pyplot as plt

    columns = min(3, len(comparisons))
    rows = math.ceil(len(comparisons) / columns)
    figure, panels = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False, sharey=True)
    for axes in panels.flat[len(comparisons):]:
        axes.set_visible(False)
    for axes, (title, per_test) in zip(panels.flat, comparisons.items()):
        width = 0.8 / len(per_test)
        for offset, (test, rows) in enumerate(per_test.items()):
            axes.bar([i + offset * width for i in range(len(BUCKETS))], [r["contribution"] for r in rows[:-1]], width,
                     label=f"{test} (total {rows[-1]['contribution']:+.3f})")
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(BUCKETS))], BUCKETS, rotation=20, fontsize=8)
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_title(title, fontsize=9)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize=8)
    for axes in panels[:, 0]:
        axes.set_ylabel("share × NLL difference (nats)")
    figure.suptitle("Contribution of each bucket to the decoder's NLL minus the count model's (> 0: the decoder loses)",
                    fontsize=10)
    figure.tight_layout()
    return utilities.save_figure(figure, path)


# ---------------------------------------------------------------- the study


def kneser_ney_rows(words, train_lm: str, validation_fraction: float, tests: dict) -> dict:
    """The course's Kneser–Ney and Kneser–Ney with novel-word mass: validation and test NLLs, the tuned weight."""
    started = time.perf_counter()
    train_text, validation_text = split_lines(train_lm, validation_fraction)
    part, validation, everything = (words.encode(text) for text in (train_text, validation_text, train_lm))
    course = KneserNeyTrigram(everything, words.vocab_size)
    with_mass, tuning = baselines.novel_mass_kneser_ney(part, validation, everything, words.vocab_size)
    rows = {"kneser_ney": {"validation_perplexity": KneserNeyTrigram(part, words.vocab_size).perplexity(validation),
                           "nll": {name: count_model_nlls(course, ids) for name, ids in tests.items()}},
            "kneser_ney_novel_mass": {"validation_perplexity": tuning["validation_perplexity"], "weight": tuning["weight"],
                                      "nll": {name: count_model_nlls(with_mass, ids) for name, ids in tests.items()}}}
    for row in rows.values():
        row["seconds"] = time.perf_counter() - started
    return rows


def train_decoder(run, config, settings, seed: int, build_model=None, wrap_batches=None, log=print):
    """The selection run (validation picks the iteration) and the refit on all of train_LM.txt up to it."""
    def train(settings):
        return training.train_language_model(run, config, settings, seed, log, build_model=build_model,
                                             wrap_batches=wrap_batches)
    selection = train(replace(settings, refit=False))
    # the refit evaluates once, at its end: only its final figures are read
    final = training.refit_after(selection, replace(settings, eval_interval=selection.chosen), train, TRAIN_LM, log)
    return selection.model, final.model, {"best_iteration": final.chosen, "seconds": final.train_seconds,
                                          "validation_perplexity": selection.final["validation_perplexity"]}


@dataclass(frozen=True)
class DecoderRow:
    """One decoder row of the study, on the best preset: its model factory, its changes, how many seeds."""

    build: Callable | None = None  # a model factory for training.train_language_model (None: the plain TransformerLM)
    training: dict = field(default_factory=dict)  # changes to the preset's TrainingConfig
    noise: tuple[str, float] | None = None  # (kind, gamma) of dataset.input_noise on the training inputs
    seeds: int = 1  # > 1: an ensemble (averaging.ProbabilityAverage) of decoders trained with seeds seed, seed + 1, ...


HALF = novel.novel_class_builder(0.5)  # half of each singleton target stays the word: they keep some probability


def kneser_ney_noised(gamma0: float, iterations: int, seeds: int = 1) -> DecoderRow:
    """The half <novel> class with Kneser-Ney data noising (Xie et al., 2017) at gamma0 (a word's rate is
    gamma0 N1+(x, .) / c(x)), on a schedule of `iterations` (noised decoders train more slowly: longer than the preset's)."""
    return DecoderRow(HALF, training={"max_iters": iterations}, noise=("kneser_ney", gamma0), seeds=seeds)


# the rows docs/gap.md's headline table shows; the sweeps that chose them (EMA, embedding dropout, unigram and
# blank noising, other rates and schedules) are described there
DECODERS = {
    "best": DecoderRow(),
    "best_novel_class_half": DecoderRow(HALF),
    "half_kneser_ney_noise_0.4_2000_steps": kneser_ney_noised(0.4, 2000),
    "half_kneser_ney_noise_0.4_2000_steps_seeds3": kneser_ney_noised(0.4, 2000, seeds=3),
    "half_kneser_ney_noise_0.3_1500_steps_seeds3": kneser_ney_noised(0.3, 1500, seeds=3),
}


# the rows `--gap` trains (six trainings): the plain decoder, the half <novel> class and the best single noised
# decoder; bench/gap_study.py --decoders runs any of DECODERS
HEADLINE = ("best", "best_novel_class_half", "half_kneser_ney_noise_0.4_2000_steps")


def train_row(run, row: DecoderRow, config, settings, seed: int, log=print):
    """A row's selection and final decoders (each a seed ensemble when row.seeds > 1) and its report; an
    ensemble's report has each member's validation and test perplexities and the sum of their seconds."""
    settings = replace(settings, **row.training).validate()
    noise = input_noise(*row.noise) if row.noise else None
    if row.seeds == 1:
        return train_decoder(run, config, settings, seed, row.build, noise, log)
    members = [train_decoder(run, config, settings, seed + offset, row.build, noise, log) for offset in range(row.seeds)]
    tests = {name: training.encode_stream(run, run.data.test_lm[name]) for name in TESTS}
    report = {"best_iteration": [report["best_iteration"] for _, _, report in members],
              "seconds": sum(report["seconds"] for _, _, report in members),
              "members": [{"seed": seed + offset, "validation_perplexity": report["validation_perplexity"],
                           "perplexity": {name: training.perplexity(model, ids, config.block_size, run.device)
                                          for name, ids in tests.items()}}
                          for offset, (_, model, report) in enumerate(members)]}
    return (averaging.ProbabilityAverage([selection for selection, _, _ in members]),
            averaging.ProbabilityAverage([model for _, model, _ in members]), report)


def decoder_rows(run, seed: int, names=None, log=print) -> dict:
    """The best preset's decoders of `names`, each also with novel-word mass (its weight tuned on validation with
    the selection model and the words that model never saw; 0 where the decoder already gives them enough)."""
    config, settings = training.model_config(run, "lm", preset="best"), training.training_config(run, "lm", preset="best")
    train_text, validation_text = split_lines(run.data.train_lm, settings.validation_fraction)
    part, validation = training.encode_stream(run, train_text), training.encode_stream(run, validation_text)
    everything = training.encode_stream(run, run.data.train_lm)
    tests = {name: training.encode_stream(run, run.data.test_lm[name]) for name in TESTS}
    never_seen_part = novel.never_seen_mask(novel.word_counts(part, config.vocab_size))
    never_seen_all = novel.never_seen_mask(novel.word_counts(everything, config.vocab_size))

    def nlls(model):
        return {name: target_nlls(model, ids, config.block_size, run.device) for name, ids in tests.items()}

    rows = {}
    for name in names or HEADLINE:
        log(f"\n== gap: decoder {name}")
        selection, model, report = train_row(run, DECODERS[name], config, settings, seed, log)
        validation_nll = target_nlls(selection, validation, config.block_size, run.device)
        report.setdefault("validation_perplexity", math.exp(validation_nll.mean().item()))
        rows[name] = {**report, "nll": nlls(model)}
        probabilities = (-validation_nll).exp().tolist()
        weight, perplexities = baselines.tune_novel_weight(probabilities, never_seen_part[validation[1:]].tolist(),
                                                           int(never_seen_part.sum()))
        rows[f"{name}_novel_mass"] = {**report, "weight": weight, "validation_perplexity": perplexities[weight],
                                      "nll": nlls(novel.NovelWordMixture(model, never_seen_all, weight))}
    return rows


COMPARISONS = (("best", "kneser_ney"), ("best_novel_mass", "kneser_ney_novel_mass"),
               ("best_novel_class_half", "kneser_ney_novel_mass"), ("best_novel_class_half_novel_mass", "kneser_ney_novel_mass"),
               *((f"{name}_novel_mass", "kneser_ney_novel_mass") for name in DECODERS if name.startswith("half_")))


def summarise(rows: dict, target_buckets: dict) -> dict:
    """Perplexities of every row and the gap tables of COMPARISONS (NLL tensors dropped, for JSON)."""
    models = {name: {**{k: v for k, v in row.items() if k != "nll"},
                     "perplexity": {test: math.exp(nll.mean().item()) for test, nll in row["nll"].items()}}
              for name, row in rows.items()}
    gaps = {f"{decoder} vs {count}": {test: gap_rows(target_buckets[test], rows[decoder]["nll"][test], rows[count]["nll"][test])
                                      for test in target_buckets}
            for decoder, count in COMPARISONS if decoder in rows and count in rows}
    return {"models": models, "gaps": gaps}


def target_buckets_of(words, train_lm: str, tests: dict) -> dict:
    """The bucket of every scored target (tokens after the first) of each test stream."""
    buckets = bucket_of_ids(novel.word_counts(torch.tensor(words.encode(train_lm)), words.vocab_size))
    return {name: buckets[torch.as_tensor(ids)[1:]] for name, ids in tests.items()}


def study(run, seed: int, names=None, log=print) -> dict:
    """Count models and the decoders of `names` (default: HEADLINE) on the same targets; their perplexities
    and the gap tables."""
    if run.tokenizer is not run.words:
        raise ValueError("the gap study buckets words: it needs --tokenizer word")
    started = time.perf_counter()
    tests = {name: run.words.encode(run.data.test_lm[name]) for name in TESTS}
    settings = training.training_config(run, "lm", preset="best")
    rows = kneser_ney_rows(run.words, run.data.train_lm, settings.validation_fraction, tests)
    rows.update(decoder_rows(run, seed, names, log))
    result = summarise(rows, target_buckets_of(run.words, run.data.train_lm, tests))
    result.update(seed=seed, seconds=time.perf_counter() - started)
    return result


def checkpoint_gap(model, words, data, device) -> dict:
    """A saved decoder against both Kneser–Ney rows, on the course's test files."""
    tests = {name: words.encode(data.test_lm[name]) for name in TESTS}
    rows = kneser_ney_rows(words, data.train_lm, baselines.VALIDATION_FRACTION, tests)
    rows["checkpoint"] = {"nll": {name: target_nlls(model, torch.tensor(ids), model.config.block_size, device)
                                  for name, ids in tests.items()}}
    buckets = target_buckets_of(words, data.train_lm, tests)
    models = {name: {"perplexity": {t: math.exp(nll.mean().item()) for t, nll in row["nll"].items()},
                     **{k: v for k, v in row.items() if k not in ("nll", "seconds")}} for name, row in rows.items()}
    gaps = {f"checkpoint vs {count}": {t: gap_rows(buckets[t], rows["checkpoint"]["nll"][t], rows[count]["nll"][t])
                                       for t in TESTS} for count in ("kneser_ney", "kneser_ney_novel_mass")}
    return {"models": models, "gaps": gaps}


def models_table(models: dict) -> str:
    """One row per model: the novel-word weight, validation and test perplexity, training seconds."""
    rows = [[name, f"{m['weight']:.3f}" if "weight" in m else "", f"{m['validation_perplexity']:.1f}"
             if "validation_perplexity" in m else "", *(f"{m['perplexity'][t]:.1f}" for t in TESTS),
             f"{m['seconds']:.0f}" if "seconds" in m else ""] for name, m in models.items()]
    return utilities.markdown_table(["model", "novel weight", "validation ppl", *TESTS, "seconds"], rows)


def tables(result: dict) -> dict[str, str]:
    """The models table (gap_models) and one table per comparison (gap_DECODER_vs_COUNT), per test file."""
    found = {"gap_models": models_table(result["models"])}
    for comparison, per_test in result["gaps"].items():
        decoder, count = comparison.split(" vs ")
        found[f"gap_{decoder}_vs_{count}"] = "\n\n".join(f"{test}\n\n{gap_table(rows, decoder, count)}"
                                                         for test, rows in per_test.items())
    return found


def plot(result: dict, out):
    """The bucket contributions of every comparison (gap.png)."""
    if result["gaps"]:
        plot_gap(result["gaps"], out / "gap.png")


def run_study(run: training.Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """The headline rows of the study at the command's seed (no attention checks)."""
    return study(run, context.seed, log=log), []


STUDY = Study("gap", "gap", "gap by word frequency (docs/gap.md)",
              "also the gap to Kneser-Ney by word frequency, with the headline decoder rows (docs/gap.md)",
              run_study, tables, plot)
