"""The generative classifier (models/class_conditional.py): a row's log-likelihood against a one-prefix-at-a-time loop,
and Bayes' rule against its formula (its fine-tuning is tested in test_transfer.py)."""

import pytest
import torch

from models.class_conditional import ClassConditionalDecoders, sequence_log_likelihoods
from transformer import TransformerConfig, TransformerLM


def tiny_decoder(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=13, n_embd=16, n_head=2, n_layer=2, block_size=6, ff_hidden=32, dropout=0.0)
    return TransformerLM(config).eval()


def brute_force_log_likelihood(decoder: TransformerLM, row: list[int], start: int) -> float:
    """Each token scored alone, after the whole prefix before it (start token first), no padding anywhere."""
    sequence = [start, *row][:decoder.config.block_size + 1]
    with torch.no_grad():
        return sum(decoder(torch.tensor([sequence[:t]])).logits[0, -1].log_softmax(-1)[sequence[t]].item()
                   for t in range(1, len(sequence)))


def test_a_rows_log_likelihood_is_the_sum_over_its_tokens_after_the_start_token():
    decoder = tiny_decoder(0)
    rows = [[3], [4, 5, 6], [7, 8, 9, 10, 11, 12, 1, 2], [2, 2]]  # one row longer than the 6-token context: cut
    found = sequence_log_likelihoods(decoder, rows, start_id=1, device="cpu", batch_size=3)  # two batches, padded
    expected = [brute_force_log_likelihood(decoder, row, 1) for row in rows]
    assert found.tolist() == pytest.approx(expected, abs=1e-4)


def test_bayes_rule_weighs_each_class_likelihood_by_its_prior():
    decoders, prior = [tiny_decoder(0), tiny_decoder(1), tiny_decoder(2)], torch.tensor([0.5, 0.3, 0.2])
    rows = [[3, 4], [5, 6, 7]]
    posterior = ClassConditionalDecoders(decoders, prior, start_id=1).probabilities(rows, "cpu")
    for index, row in enumerate(rows):
        joint = torch.tensor([brute_force_log_likelihood(d, row, 1) for d in decoders]).exp() * prior
        assert posterior[index].tolist() == pytest.approx((joint / joint.sum()).tolist(), abs=1e-5)
    same = ClassConditionalDecoders([decoders[0]] * 3, prior, start_id=1).probabilities(rows, "cpu")
    assert torch.allclose(same, prior.expand(2, 3), atol=1e-6)  # equal likelihoods: the prior alone
