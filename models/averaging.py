"""Averaging (the gap study, docs/gap.md): an exponential moving average of the weights along one run, and an ensemble that
averages the next-word probabilities of decoders trained with different seeds.

`WeightAverage` wraps a decoder or a classifier: in training mode it is the model, and before each training step
it folds the current weights (those after the previous optimizer step) into the average; in evaluation mode it
runs the averaged copy. So training.train_language_model and training.train_classifier evaluate, select and refit
on the averaged weights without a change to their loop (pass `ema_builder(decay)` as their build_model).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from transformer import Output, TransformerConfig, TransformerLM


class WeightAverage(nn.Module):
    """A model trained as usual whose evaluations use an exponential moving average of its weights."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.model = model
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.average.requires_grad_(False)  # trained by averaging alone (and not counted by count_parameters)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    def forward(self, *args, **kwargs) -> Output:
        """Training: the live model (after averaging in its weights); evaluation: the averaged copy."""
        # once per training forward pass: once per optimiser step, unless --grad-accum splits the step
        if self.training:
            with torch.no_grad():
                self.average.update_parameters(self.model)
            return self.model(*args, **kwargs)
        return self.average.module(*args, **kwargs)


def ema_builder(decay: float, inner=None, model_class=TransformerLM):
    """A build_model for train_language_model or train_classifier: inner's model (or a model_class) behind an EMA."""
    # train_language_model calls build(config, train_stream), train_classifier build(config)
    def build(config, *data):
        return WeightAverage(inner(config, *data) if inner else model_class(config), decay)
    return build


class ProbabilityAverage(nn.Module):
    """A seed ensemble: the mean of its members' next-word probabilities (not of their logits), returned as
    log-probabilities in `logits`, so training.perplexity and gap.target_nlls score it unchanged."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> TransformerConfig:
        return self.members[0].config

    def forward(self, idx, targets=None, caches=None, return_attention=False) -> Output:
        """idx: (B, T) ids. log(mean_m P_m(w | context)) over the vocabulary; loss: mean NLL of `targets`.
        No cached decoding (each member would need caches of its own) and no attention maps."""
        if caches is not None:
            raise ValueError("a seed ensemble scores whole windows: no KV caches")
        log_probs = torch.stack([member(idx).logits.log_softmax(-1) for member in self.members])  # (M, B, T, V)
        mean = torch.logsumexp(log_probs, 0) - math.log(len(self.members))  # (B, T, V)
        loss = None if targets is None else F.nll_loss(mean.flatten(0, 1), targets.flatten())
        return Output(mean, loss, None)
