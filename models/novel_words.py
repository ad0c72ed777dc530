"""Probability for the words a decoder never saw in training, two ways (the gap study, docs/gap.md).

About 1,200 of the course vocabulary's words occur in train_CLS.tsv but never in train_LM.txt, and with `<unk>`
they are 7-9% of every test file's targets; a decoder trained on train_LM.txt learns to give them almost nothing.

- `NovelWordMixture`: post hoc, move a fraction λ of every next-word distribution evenly onto those words
  (λ chosen on validation), as baselines.NovelMassKneserNey does for the trigram.
- `NovelClassLM`: learned, the decoder gets one more output, `<novel>`; training targets whose word occurs once in
  the training text count (a share `novel_share` of them, 1 = all) as `<novel>`, so the model learns
  P(a word it has not seen | context) from the words it saw once (Good–Turing's estimate of the unseen mass).
  At evaluation P(`<novel>`) is spread evenly over the never-seen words, whose own outputs are dropped: each gets
  exactly P(`<novel>`) / |never seen|, and the distribution over the vocabulary sums to 1.

Both wrappers return log-probabilities over the vocabulary as their `logits`, so training.perplexity (which
takes a cross-entropy of the logits) scores them unchanged: log_softmax of normalised log-probabilities is itself.
Only which vocabulary words occur in the training text is used, as Kneser–Ney's uniform floor does.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer import PAD_ID
from transformer import Output, TransformerConfig, TransformerLM


def word_counts(train_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each vocabulary id occurs in the training stream: (V,)."""
    return torch.bincount(torch.as_tensor(train_ids).flatten(), minlength=vocab_size)


def never_seen_mask(counts: torch.Tensor) -> torch.Tensor:
    """(V,) True for the ids that never occur in training (`<unk>` included), `<pad>` excepted: it is never a target."""
    mask = counts == 0
    mask[PAD_ID] = False
    return mask


def mixture_log_probs(log_probs: torch.Tensor, never_seen: torch.Tensor, weight: float) -> torch.Tensor:
    """log((1 - weight) P(w) + weight / |never seen| for the never-seen w): (..., V) in, (..., V) out."""
    if weight == 0:
        return log_probs
    spread = torch.full_like(log_probs[..., :1], math.log(weight / int(never_seen.sum())))
    moved = torch.logaddexp(log_probs + math.log1p(-weight), spread)
    return torch.where(never_seen, moved, log_probs + math.log1p(-weight))


def novel_class_log_probs(logits: torch.Tensor, never_seen: torch.Tensor) -> torch.Tensor:
    """(..., V + 1) logits, the last for `<novel>`, to (..., V) log-probabilities: a softmax over the seen words
    and `<novel>`, then P(`<novel>`) split evenly over the never-seen words."""
    words, novel = logits[..., :-1].masked_fill(never_seen, -math.inf), logits[..., -1:]
    log_norm = torch.logsumexp(torch.cat([words, novel], -1), -1, keepdim=True)
    return torch.where(never_seen, novel - log_norm - math.log(int(never_seen.sum())), words - log_norm)


class NovelWordMixture(nn.Module):
    """A trained decoder whose every distribution gives a fraction `weight` evenly to the never-seen words."""

    def __init__(self, model: nn.Module, never_seen: torch.Tensor, weight: float):
        super().__init__()
        self.model, self.weight = model, weight
        self.register_buffer("never_seen", never_seen, persistent=False)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    def forward(self, idx, targets=None, caches=None, return_attention=False) -> Output:
        """Log-probabilities over the vocabulary as logits; loss: mean NLL of `targets`."""
        output = self.model(idx, caches=caches, return_attention=return_attention)
        log_probs = mixture_log_probs(output.logits.log_softmax(-1), self.never_seen, self.weight)
        loss = None if targets is None else F.nll_loss(log_probs.flatten(0, 1), targets.flatten())
        return Output(log_probs, loss, output.attentions)


class NovelClassLM(nn.Module):
    """A decoder with one more output, `<novel>`, learned from the singletons of the training stream."""

    def __init__(self, config: TransformerConfig, train_ids: torch.Tensor, novel_share: float = 1.0):
        super().__init__()
        if config.label_smoothing:
            raise ValueError("the novel-word class does not combine with label smoothing")
        self.vocab_size = config.vocab_size
        self.model = TransformerLM(replace(config, vocab_size=config.vocab_size + 1))  # id V is <novel>
        counts = word_counts(train_ids, config.vocab_size)
        self.novel_share = novel_share
        self.register_buffer("singleton", counts == 1, persistent=False)
        self.register_buffer("never_seen", never_seen_mask(counts), persistent=False)

    @property
    def config(self) -> TransformerConfig:
        return replace(self.model.config, vocab_size=self.vocab_size)

    def forward(self, idx, targets=None, caches=None, return_attention=False) -> Output:
        """Log-probabilities over the vocabulary as logits; in training the loss counts singleton targets
        (a share novel_share of each) as `<novel>`, in evaluation it is the NLL of the spread distribution."""
        output = self.model(idx, caches=caches, return_attention=return_attention)
        log_probs = novel_class_log_probs(output.logits, self.never_seen)
        loss = None
        if targets is not None and self.training:
            full = output.logits.log_softmax(-1)  # (B, T, V + 1)
            word = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
            share = self.singleton[targets] * self.novel_share  # (B, T): 0 for every other word
            loss = -((1 - share) * word + share * full[..., -1]).mean()
        elif targets is not None:
            loss = F.nll_loss(log_probs.flatten(0, 1), targets.flatten())
        return Output(log_probs, loss, output.attentions)


def novel_class_builder(novel_share: float = 1.0):
    """A model factory for training.train_language_model: a NovelClassLM on that run's training stream."""
    return lambda config, train_stream: NovelClassLM(config, train_stream, novel_share)
