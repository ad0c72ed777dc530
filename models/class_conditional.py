"""A generative classifier made of language models: one decoder per class, and Bayes' rule.

    P(c | x) = P(c) P_c(x) / sum_k P(k) P_k(x),    P_c(x) = prod_t P_c(x_t | start, x_<t)

Naive Bayes is this rule with a bag-of-words model per class. Here each class's model is a decoder (pretrained on
unlabelled text, then fine-tuned on that class's segments alone), so it reads word order and context as well as
which words occur. Generative classifiers reach their best with fewer labelled examples than discriminative ones
(Ng & Jordan, 2002, naive Bayes against logistic regression; Yogatama et al., 2017, with LSTM language models):
the course's 2,092 segments are that regime.
"""

import torch
from torch import nn

from transformer import TransformerLM


@torch.no_grad()
def sequence_log_likelihoods(decoder: TransformerLM, rows: list[list[int]], start_id: int, device,
                             batch_size: int = 128) -> torch.Tensor:
    """log P(row | start_id) under `decoder` of each row of token ids, summed over the row's tokens (its first
    block_size of them): (N,) float64."""
    decoder.eval()
    limit = decoder.config.block_size
    found = []
    for first in range(0, len(rows), batch_size):
        chunk = [[start_id, *row][:limit + 1] for row in rows[first:first + batch_size]]
        width = max(2, *map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)  # (B, T): a real target, not padding
        for index, row in enumerate(chunk):
            ids[index, :len(row)] = torch.tensor(row)
            scored[index, :len(row) - 1] = True
        ids = ids.to(device)
        logits = decoder(ids[:, :-1]).logits.float()  # (B, T, V); causal, so padding after a row cannot reach it
        token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()  # (B, T)
        found.append(token.masked_fill(~scored, 0.0).sum(1).double())
    return torch.cat(found)


class ClassConditionalDecoders(nn.Module):
    """One decoder per class and the class prior: a classifier by Bayes' rule."""

    def __init__(self, decoders: list[TransformerLM], prior: torch.Tensor, start_id: int):
        super().__init__()
        if len(decoders) != len(prior):
            raise ValueError(f"{len(decoders)} decoders for {len(prior)} classes")
        self.decoders = nn.ModuleList(decoders)
        self.register_buffer("log_prior", prior.double().log())  # (C,)
        self.start_id = start_id

    def log_joint(self, rows: list[list[int]], device) -> torch.Tensor:
        """log P(c) + log P_c(row) of each row and class: (N, C) float64."""
        likelihoods = [sequence_log_likelihoods(decoder, rows, self.start_id, device) for decoder in self.decoders]
        return torch.stack(likelihoods, 1) + self.log_prior.cpu()

    def probabilities(self, rows: list[list[int]], device) -> torch.Tensor:
        """P(c | row), (N, C)."""
        return self.log_joint(rows, device).softmax(-1).float()
