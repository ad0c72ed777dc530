"""The T5-style encoder-decoder on the speeches: span corruption (Raffel et al., 2020), training through
training.fit, the target perplexity on the test speeches, and greedy and beam decoding through generation.py.

A study module (`--t5`): the model lives in models/encoder_decoder.py.
"""

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F

import training
from models.encoder_decoder import EncoderDecoder
from models.generation import generate
from studies.study import Context, Study
from transformer import TransformerConfig, count_parameters

NOISE_DENSITY, MEAN_SPAN_LENGTH = 0.15, 3.0  # T5's: 15% of the tokens, in spans of 3 on average


@dataclass(frozen=True)
class ExtraIds:
    """Ids after the tokenizer's vocabulary: a decoder start (<bos>), an end (<eos>) and the sentinels <X0>, <X1>, ..."""

    vocab_size: int  # the tokenizer's
    sentinels: int

    @property
    def bos(self) -> int:
        return self.vocab_size

    @property
    def eos(self) -> int:
        return self.vocab_size + 1

    def sentinel(self, k: int) -> int:
        return self.vocab_size + 2 + k

    @property
    def total(self) -> int:
        return self.vocab_size + 2 + self.sentinels


def random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """n_segments positive lengths summing to n_items, uniformly among such splits."""
    cuts = sorted((torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1).tolist())
    edges = [0, *cuts, n_items]
    return [b - a for a, b in pairwise(edges)]


def span_counts(length: int) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` tokens."""
    noise = min(max(1, round(length * NOISE_DENSITY)), length - 1)
    return noise, max(1, min(noise, length - noise, round(noise / MEAN_SPAN_LENGTH)))


def span_corrupt(tokens: list[int], extra: ExtraIds, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(source, target): random spans replaced by sentinels in the source; the target lists each sentinel then
    its span, then <eos> (T5's objective). Kept and dropped stretches alternate, starting with a kept one."""
    noise, spans = span_counts(len(tokens))
    noise_lengths = random_segmentation(noise, spans, generator)
    kept_lengths = random_segmentation(len(tokens) - noise, spans, generator)
    source, target, i = [], [], 0
    for k, (kept, dropped) in enumerate(zip(kept_lengths, noise_lengths, strict=True)):
        source += tokens[i : i + kept]
        i += kept
        source.append(extra.sentinel(k))
        target += [extra.sentinel(k), *tokens[i : i + dropped]]
        i += dropped
    return source, target + [extra.eos]


class Pair(NamedTuple):
    """An encoder input and a decoder input, moved to a device together (training.fit calls .to)."""

    source: torch.Tensor  # (B, S)
    decoder_input: torch.Tensor  # (B, T)

    def to(self, device):
        return Pair(self.source.to(device), self.decoder_input.to(device))


def examples(windows: list[list[int]], extra: ExtraIds, generator) -> tuple[Pair, torch.Tensor]:
    """Corrupt each window; a batch of (source, <bos> + target[:-1]) and the targets. Equal windows need no padding."""
    sources, targets = zip(*(span_corrupt(window, extra, generator) for window in windows), strict=True)
    targets = torch.tensor(targets)  # (B, T)
    decoder_input = torch.cat([torch.full_like(targets[:, :1], extra.bos), targets[:, :-1]], dim=1)
    return Pair(torch.tensor(sources), decoder_input), targets


def windows_of(stream: torch.Tensor, length: int) -> list[list[int]]:
    return stream[: len(stream) // length * length].view(-1, length).tolist()


def target_perplexity(model, windows, extra: ExtraIds, seed: int, device) -> float:
    """exp of the mean cross-entropy of the target tokens (sentinels and <eos> included) given the corrupted
    source, teacher-forced; the corruption is drawn from `seed`, the same for every model."""
    generator, total, count = torch.Generator().manual_seed(seed), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), 256):
            pair, targets = examples(windows[start : start + 256], extra, generator)
            logits = model(pair.to(device)).logits
            total += F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def decoding_accuracy(model, windows, extra: ExtraIds, strategy: str, seed: int) -> float:
    """Share of target tokens that decoding (greedy or beam, through generation.generate) gets right, position by
    position, on the first windows; a decoding that stops early misses the rest."""
    generator, right, total = torch.Generator().manual_seed(seed), 0, 0
    for window in windows:
        source, target = span_corrupt(window, extra, generator)
        decoded = generate(model.conditioned_on(source), [extra.bos], len(target), strategy, beams=4, eos_id=extra.eos)
        right += sum(a == b for a, b in zip(decoded, target, strict=False))
        total += len(target)
    return 100.0 * right / total


def train_span_corruption(run, seed: int, sentinels: int = 8, decode_windows: int = 100, log=print) -> tuple:
    """Train the encoder-decoder on span corruption of train_LM.txt (the decoder's training settings);
    report the target perplexity on each test speech and greedy and beam decoding accuracy."""
    extra = ExtraIds(run.tokenizer.vocab_size, sentinels)
    config: TransformerConfig = training.model_config(run, "lm", vocab_size=extra.total)
    course = training.training_config(run, "lm")
    torch.manual_seed(seed)
    model = EncoderDecoder(config).to(run.device)
    stream = training.encode_stream(run, run.data.train_lm)
    length = config.block_size  # the source is shorter (spans become single sentinels)
    generator = torch.Generator().manual_seed(seed)
    tests = {name: windows_of(training.encode_stream(run, text), length) for name, text in run.data.test_lm.items()}

    def batches():
        while True:
            starts = torch.randint(0, len(stream) - length, (course.batch_size,), generator=generator).tolist()
            yield examples([stream[s : s + length].tolist() for s in starts], extra, generator)

    def evaluate(step, recent):
        row = {"iteration": step, "train_loss": sum(loss for loss, _, _ in recent) / len(recent),
               "target_perplexity": {name: target_perplexity(model, windows, extra, 0, run.device)
                                     for name, windows in tests.items()}}
        log(f"{step:>9} | {row['train_loss']:>10.3f} | "
            + " | ".join(f"{v:>8.2f}" for v in row["target_perplexity"].values()))
        return row

    log("iteration | train loss |    obama |    wbush |    hbush   (target perplexity)")
    evals = training.fit(model, batches(), course.max_iters, course.eval_interval, evaluate, course, run.device,
                         count_correct=False)
    obama = tests["obama"][:decode_windows]
    report = {"num_parameters": count_parameters(model), "evals": evals,
              "target_perplexity": evals[-1]["target_perplexity"],
              "decoding_accuracy": {strategy: decoding_accuracy(model, obama, extra, strategy, 1)
                                    for strategy in ("greedy", "beam")},
              "noise": {"density": NOISE_DENSITY, "mean_span": MEAN_SPAN_LENGTH, "spans": span_counts(length)[1]}}
    return model, report


def run_study(run: training.Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """Train at the command's seed and print the headline figures (no attention checks: the model has its own masks)."""
    _, report = train_span_corruption(run, context.seed, log=log)
    log(f"parameters: {report['num_parameters']:,}   target perplexity: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["target_perplexity"].items())
        + "   decoding accuracy (obama, first 100 windows): "
        + ", ".join(f"{k} {v:.1f}%" for k, v in report["decoding_accuracy"].items()))
    return report, []


STUDY = Study("t5", "t5", "T5-style encoder-decoder, span corruption of train_LM.txt",
              "also train a T5-style encoder-decoder on span corruption (models/encoder_decoder.py, "
              "studies/span_corruption.py)", run_study)
