"""The shared training loop: schedules and early stopping."""

import itertools

import torch

from training import TrainingConfig, fit, make_optimizer
from transformer import TransformerConfig, TransformerLM


def tiny_model():
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=20, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8))


def test_warmup_then_cosine_decay_to_ten_percent():
    model = tiny_model()
    optimizer, schedule = make_optimizer(model, TrainingConfig(learning_rate=1.0, warmup_steps=4, cosine_decay=True), 14)
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up
    assert rates[4] == 1.0 and abs(rates[9] - 0.55) < 1e-9  # halfway through the decay: 0.1 + 0.9 / 2
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))


def test_early_stopping_restores_the_best_validation_weights():
    model = tiny_model()
    snapshots, scores = [], iter([3.0, 1.0, 2.0, 5.0])  # the second evaluation is the best

    def evaluate(step, recent):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"step": step, "validation_score": next(scores)}

    generator = torch.Generator().manual_seed(0)
    batches = iter(lambda: (torch.randint(0, 20, (4, 8), generator=generator),) * 2, None)
    history = fit(model, batches, 8, 2, evaluate, TrainingConfig(), torch.device("cpu"))
    assert [row["step"] for row in history] == [2, 4, 6, 8]
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key])
    assert not torch.equal(snapshots[1]["lm_head.weight"], snapshots[3]["lm_head.weight"])


def test_stop_after_follows_the_full_schedule_up_to_that_step():
    """A run stopped after k of n steps ends where the full n-step run stood at step k (same rates, same batches),
    not where a k-step schedule (which decays sooner) would."""
    training = TrainingConfig(learning_rate=1e-2, warmup_steps=2, cosine_decay=True)

    def train(steps, stop_after=None):
        model = tiny_model()
        generator = torch.Generator().manual_seed(0)
        batches = iter(lambda: (torch.randint(0, 20, (4, 8), generator=generator),) * 2, None)
        states = []

        def evaluate(step, recent):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            return {"step": step}

        history = fit(model, batches, steps, 1, evaluate, training, torch.device("cpu"), stop_after=stop_after)
        return history, states

    _, full_states = train(10)
    stopped_history, stopped_states = train(10, stop_after=6)
    _, squeezed_states = train(6)
    assert [row["step"] for row in stopped_history] == [1, 2, 3, 4, 5, 6]
    for key, value in stopped_states[-1].items():
        assert torch.equal(value, full_states[5][key])
    assert not torch.equal(stopped_states[-1]["lm_head.weight"], squeezed_states[-1]["lm_head.weight"])
