"""Second-round validation sweep of the `best` preset: the exploration's winners on top of the first round.

    python main.py sweep --task classifier|lm [--data-dir DIR] [--seed 42 --seeds 3] [--candidates a,b]

Every candidate is a selection run on the validation split (10% of train_CLS.tsv, stratified, or the last
10% of train_LM.txt), without refit; it prints the best validation figure and its epoch or iteration, never
a test figure. The second-round table of docs/improvement.md comes from it.
"""

from dataclasses import replace

import training

# the first round's classifier settings differ from today's preset in these two options only
FIRST_ROUND = {"classifier": {"feedforward": "gelu", "position": "learned"}, "lm": {}}
CANDIDATES = {
    "none": {},
    "rope": {"position": "rope"},
    "disentangled": {"position": "disentangled"},
    "swiglu": {"feedforward": "swiglu"},
    "rope+swiglu": {"position": "rope", "feedforward": "swiglu"},
    "disentangled+swiglu": {"position": "disentangled", "feedforward": "swiglu"},
    "no-position": {"position": "none"},
    "no-position+swiglu": {"position": "none", "feedforward": "swiglu"},
}


# task -> (train function, the validation figure of an evaluation row)
TASKS = {"classifier": (training.train_classifier, "validation_accuracy"),
         "lm": (training.train_language_model, "validation_perplexity")}


def best_validation(run, task: str, changes: dict, seed: int) -> tuple[int, float]:
    """(epoch or iteration, validation figure) of the best evaluation of one selection run."""
    config = training.model_config(run, task, preset="best", **{**FIRST_ROUND[task], **changes})
    settings = replace(training.training_config(run, task, preset="best"), refit=False)
    train, figure = TASKS[task]
    result = train(run, config, settings, seed, log=lambda *a, **k: None)
    return result.chosen, training.best_evaluation(result.history)[figure]


def print_best_validations(run, task: str, names: list[str], seeds: list[int]):
    """Print the best validation figure, and its epoch or iteration, of each candidate and seed."""
    unit = "ppl" if task == "lm" else "acc %"
    for name in names:
        for seed in seeds:
            step, value = best_validation(run, task, CANDIDATES[name], seed)
            print(f"{task:10s} {name:22s} seed {seed}: best validation {unit} {value:.2f} at {step}", flush=True)
