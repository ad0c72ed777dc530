"""The gap study's regularisers for the frequent words, against independent references: data noising (hand counts,
the requested rates, the proposal's frequencies) and the seed ensemble (a brute-force mean of the members' softmaxes)."""


import pytest
import torch

import dataset
from dataset import NoisedBatches, WindowBatches, noised_batches
from models import averaging
from models import novel_words as novel
from tokenizer import UNK_ID
from transformer import TransformerConfig, TransformerLM

TINY = TransformerConfig(vocab_size=12, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8)

# ---------------------------------------------------------------- data noising


def constant_batches(token: int, seed: int = 0):
    return WindowBatches(torch.full((200,), token), block_size=16, batch_size=64, generator=torch.Generator().manual_seed(seed))


def test_noising_replaces_the_requested_share_by_draws_from_the_proposal():
    gamma, proposal = 0.3, torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 4.0])  # id 4 (the stream's) is never proposed
    batches = NoisedBatches(constant_batches(4), torch.full((6,), gamma), proposal, torch.Generator().manual_seed(1))
    inputs = torch.cat([next(batches)[0].flatten() for _ in range(20)])  # 20,480 inputs
    replaced = inputs[inputs != 4]
    assert len(replaced) / len(inputs) == pytest.approx(gamma, abs=0.01)  # 3 sigma: 0.0096
    observed = torch.bincount(replaced, minlength=6).double()
    expected = proposal / proposal.sum() * len(replaced)
    support = expected > 0
    chi_square = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert observed[~support].sum() == 0 and chi_square < 16.3  # 3 degrees of freedom: p = 0.001


def test_noising_leaves_the_targets_and_the_window_draws_alone():
    stream = torch.arange(2, 12).repeat(30)
    plain = WindowBatches(stream, 8, 16, torch.Generator().manual_seed(5))
    noised = noised_batches(WindowBatches(stream, 8, 16, torch.Generator().manual_seed(5)), "unigram", 0.3, stream, 12, 3)
    for _ in range(5):
        (x, y), (noisy_x, noisy_y) = next(plain), next(noised)
        assert torch.equal(y, noisy_y)
        assert 0.1 < (noisy_x != x).float().mean() < 0.45  # 0.3 * 9 / 10 expected: a draw may give back the same word
    assert noised_batches(plain, "none", 0.5, stream, 12, 3) is plain
    assert noised_batches(plain, "blank", 0.0, stream, 12, 3) is plain


def test_noising_is_deterministic_per_seed_and_resumes_from_its_state():
    stream = torch.arange(2, 12).repeat(30)

    def make(seed):
        return noised_batches(WindowBatches(stream, 8, 16, torch.Generator().manual_seed(0)), "unigram", 0.3, stream, 12, seed)

    first, again, other = make(1), make(1), make(2)
    drawn = [next(first)[0] for _ in range(3)]
    assert all(torch.equal(a, next(again)[0]) for a in drawn)
    assert not torch.equal(torch.stack(drawn), torch.stack([next(other)[0] for _ in range(3)]))
    state = first.state_dict()
    after = next(first)[0]
    first.load_state_dict(state)
    assert torch.equal(next(first)[0], after)


def test_noise_distributions_match_hand_counts():
    stream = torch.tensor([2, 3, 2, 4, 2, 3, 5])  # bigrams: 2 3, 3 2, 2 4, 4 2, 2 3, 3 5
    gamma, proposal = dataset.unigram_noise(stream, 7, 0.2)
    assert proposal.tolist() == [0, 0, 3, 2, 1, 1, 0] and gamma.tolist() == pytest.approx([0.2] * 7)
    gamma, proposal = dataset.blank_noise(stream, 7, 0.2)
    assert proposal.tolist() == [1.0 if i == UNK_ID else 0.0 for i in range(7)]
    gamma, proposal = dataset.kneser_ney_noise(stream, 7, 0.2)
    # 2 is followed by {3, 4} in 3 bigrams, 3 by {2, 5} in 2, 4 by {2} in 1; preceded: 2 by {3, 4}, 3 by {2}, 4 by {2},
    # 5 by {3}
    assert gamma.tolist() == pytest.approx([0, 0, 0.2 * 2 / 3, 0.2 * 2 / 2, 0.2 * 1 / 1, 0, 0])
    assert proposal.tolist() == [0, 0, 2, 1, 1, 1, 0]


def test_the_noise_hook_refuses_an_unknown_noise_or_rate():
    with pytest.raises(ValueError, match="input noise"):
        dataset.input_noise("gaussian", 0.1)
    with pytest.raises(ValueError, match="input noise"):
        dataset.input_noise("unigram", 1.0)


# ---------------------------------------------------------------- seed ensembles


def test_ensemble_is_the_mean_of_the_members_probabilities():
    members = []
    for seed in (42, 43):
        torch.manual_seed(seed)
        members.append(TransformerLM(TINY).eval())
    torch.manual_seed(44)  # a member whose logits are already log-probabilities over the vocabulary
    members.append(novel.NovelClassLM(TINY, torch.tensor([2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11])).eval())
    ensemble = averaging.ProbabilityAverage(members)
    idx, targets = torch.tensor([[2, 3, 4, 5], [6, 7, 1, 2]]), torch.tensor([[3, 4, 5, 6], [7, 1, 2, 3]])
    with torch.no_grad():
        output = ensemble(idx, targets)
        probabilities = output.logits.exp()
        brute = sum(torch.softmax(member(idx).logits, -1) for member in members) / 3
    assert torch.allclose(probabilities.sum(-1), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(probabilities, brute, atol=1e-6)
    expected = -brute.gather(-1, targets.unsqueeze(-1)).log().mean()
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
