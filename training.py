"""Training and evaluation shared by every part: configs, presets, one train loop, accuracy and perplexity.

Split from main.py so that the command line stays a thin shell and experiments.py can reuse the same
functions; nothing here knows about argparse.
"""

import copy
import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from dataset import (
    DataError,
    LabelledSegments,
    consecutive_windows,
    encode_segments,
    load_speeches,
    random_windows,
    shuffled_batches,
    split_lines,
    stratified_split,
)
from tokenizer import ByteBPETokenizer, WordTokenizer
from transformer import TransformerClassifier, TransformerConfig, TransformerLM, count_parameters


@dataclass
class TrainingConfig:
    """Optimisation options; the defaults are the course's."""

    batch_size: int = 16
    learning_rate: float = 1e-3
    epochs: int = 15  # classifier
    max_iters: int = 500  # language model
    eval_interval: int = 100  # language model
    weight_decay: float = 0.0  # decoupled (AdamW); 0 is plain Adam
    warmup_steps: int = 0
    cosine_decay: bool = False  # decay to 10% of the rate over training, after the warm-up
    # > 0: hold out this fraction of the training file (stratified for the classifier, the last lines
    # for the language model), evaluate on it, and keep the model from the best evaluation
    validation_fraction: float = 0.0
    # with a validation split: retrain from scratch on the whole training file, under the same schedule, up to
    # the epoch or iteration that validation chose, so the final model also learns the held-out text
    refit: bool = False
    # stop after this many epochs (classifier) or iterations (language model) of the schedule planned for
    # `epochs` / `max_iters`; None: run it all. The refit uses it, so that its learning rate at each step is the
    # one of the selection run (a schedule squeezed into fewer steps decays sooner and undertrains)
    stop_after: int | None = None

    def validate(self) -> "TrainingConfig":
        for name in ("batch_size", "epochs", "max_iters", "eval_interval", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(f"validation fraction must be in [0, 0.5), got {self.validation_fraction}")
        return self


@dataclass
class Preset:
    """Changes from the course base model and training, per task."""

    classifier: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    lm: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))


# Named presets, in one place. "best" was chosen on validation splits only (README, part three: improve).
PRESETS = {
    "base": Preset(),
    "best": Preset(
        # the classifier drops position embeddings and uses SwiGLU (a validation sweep over the exploration's winners)
        classifier=({"init_std": 0.02, "dropout": 0.1, "feedforward": "swiglu", "ff_hidden": 256, "position": "none",
                     "label_smoothing": 0.1},
                    {"batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.1, "epochs": 30, "warmup_steps": 100,
                     "cosine_decay": True, "validation_fraction": 0.1, "refit": True}),
        lm=({"init_std": 0.02, "dropout": 0.3, "feedforward": "gelu", "ff_hidden": 256, "tie_embeddings": True},
            {"batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.1, "max_iters": 800, "eval_interval": 100,
             "warmup_steps": 100, "cosine_decay": True, "validation_fraction": 0.1, "refit": True}),
    ),
}


@dataclass
class Run:
    """What every part needs: options, data, tokenizer, device and output folder."""

    args: object
    data: object
    tokenizer: WordTokenizer | ByteBPETokenizer
    device: torch.device
    out: object
    words: WordTokenizer  # counts words for word-level perplexity, whatever the model's tokenizer

    @property
    def heatmap_dir(self):
        """Where attention heatmaps go; None with --no-plots."""
        return None if self.args.no_plots else self.out / "attention"


# ---------------------------------------------------------------- a command's run: device, data, configs


def resolve_device(name: str) -> torch.device:
    """The torch device for --device (auto: CUDA if present, else CPU); an unusable one raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {name!r} is not usable here: {str(error).splitlines()[0]}") from None
    return device


def make_run(args) -> Run:
    """Read the data and build the vocabulary once for a whole command."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be positive, got {args.seeds}")
    device = resolve_device(args.device)
    data = load_speeches(args.data_dir)
    words = WordTokenizer.from_texts(data.vocabulary_texts())
    tokenizer = words if args.tokenizer == "word" else ByteBPETokenizer.from_texts(data.vocabulary_texts(), args.bpe_vocab)
    return Run(args, data, tokenizer, device, args.out, words)


MODEL_FLAGS = ("block_size", "n_embd", "n_head", "n_layer", "ff_hidden")
TRAINING_FLAGS = ("batch_size", "learning_rate", "epochs", "max_iters", "eval_interval")


def flags(args, names) -> dict:
    """The options among `names` given on the command line (None means: not given)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def model_config(run: Run, task: str, preset: str | None = None, **changes) -> TransformerConfig:
    """The course base model, then the preset's changes for `task` (default --preset), the size flags given,
    then `changes`."""
    preset = getattr(PRESETS[preset or run.args.preset], task)[0]
    config = TransformerConfig(vocab_size=run.tokenizer.vocab_size)
    return replace(config, **{**preset, **flags(run.args, MODEL_FLAGS), **changes}).validate()


def training_config(run: Run, task: str, preset: str | None = None) -> TrainingConfig:
    """The course training, then the preset's changes for `task` (default --preset), then the training flags given."""
    preset = getattr(PRESETS[preset or run.args.preset], task)[1]
    return replace(TrainingConfig(), **{**preset, **flags(run.args, TRAINING_FLAGS)}).validate()



# ---------------------------------------------------------------- the shared training loop


def make_optimizer(model, training: TrainingConfig, total_steps: int):
    """Adam(W) and a per-step learning-rate schedule (constant by default)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())  # one kernel for all parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay,
                                  fused=fused)

    def factor(step):
        if step < training.warmup_steps:
            return (step + 1) / training.warmup_steps
        if not training.cosine_decay:
            return 1.0
        progress = (step - training.warmup_steps) / max(1, total_steps - training.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(model, batches, steps: int, eval_every: int, evaluate, training: TrainingConfig, device,
        count_correct: bool = True, stop_after: int | None = None) -> list[dict]:
    """Train for `steps` batches (or the first `stop_after` of them, under the schedule planned for `steps`);
    every `eval_every` steps and at the last, call evaluate(step, steps_since_last_eval),
    where each step is (loss, number of correct argmax predictions or 0 without count_correct, number of targets).
    If evaluate's rows carry "validation_score" (lower is better), the best model is restored at the end."""
    optimizer, schedule = make_optimizer(model, training, steps)
    history, running, best = [], [], None
    model.train()
    last = min(steps, stop_after or steps)
    for step in range(1, last + 1):
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        output = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        schedule.step()
        # an argmax over the decoder's (B, T, vocabulary) logits costs ~7% of its step: only when asked for
        correct = (output.logits.detach().argmax(-1) == targets).sum().item() if count_correct else 0
        running.append((output.loss.item(), correct, targets.numel()))
        if step % eval_every == 0 or step == last:
            model.eval()
            history.append(evaluate(step, running))
            score = history[-1].get("validation_score")
            if score is not None and (best is None or score < best[0]):
                best = (score, copy.deepcopy(model.state_dict()))
            model.train()
            running = []
    model.eval()
    if best is not None:  # early stopping: the weights of the best validation evaluation
        model.load_state_dict(best[1])
    return history


def best_evaluation(history: list[dict]) -> dict:
    """The first evaluation row with the lowest validation_score: the one fit() restores."""
    return min(history, key=lambda row: row["validation_score"])


# ---------------------------------------------------------------- classifier


@torch.no_grad()
def predict(model, ids: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities of each row of ids."""
    model.eval()
    return torch.cat([model(chunk.to(device)).logits.softmax(-1).cpu() for chunk in ids.split(batch_size)])


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor, where=None) -> float:
    """Percent correct argmax predictions, over the rows selected by the boolean `where` (all by default)."""
    if where is not None:
        probabilities, labels = probabilities[where], labels[where]
    return 100.0 * (probabilities.argmax(-1) == labels).float().mean().item() if len(labels) else float("nan")


def classifier_tensors(run: Run, segments: LabelledSegments, block_size: int):
    """(N, block_size) padded ids and (N,) labels."""
    return encode_segments(run.tokenizer, segments.texts, block_size), torch.tensor(segments.labels)


def test_splits(run: Run) -> dict[str, torch.Tensor]:
    """Boolean masks over the test segments: text seen in train_CLS.tsv, unseen, and in neither training file."""
    train_texts = set(run.data.train_cls.texts)
    seen = torch.tensor([text in train_texts for text in run.data.test_cls.texts])
    in_lm = torch.tensor([text in run.data.train_lm for text in run.data.test_cls.texts])
    return {"seen": seen, "unseen": ~seen, "unseen_both": ~seen & ~in_lm}


def classifier_report(run: Run, probabilities: torch.Tensor) -> dict:
    """Test accuracy overall and on the seen / unseen / in-neither-training-file segments."""
    labels = torch.tensor(run.data.test_cls.labels)
    splits = test_splits(run)
    report = {"test_accuracy": accuracy(probabilities, labels)}
    for name, where in splits.items():
        report[f"test_accuracy_{name}"] = accuracy(probabilities, labels, where)
        report[f"num_test_{name}"] = int(where.sum())
    return report


def train_classifier(run: Run, config: TransformerConfig, training: TrainingConfig, seed: int, log=print):
    """Train the encoder classifier; return the model and its report (per-epoch table, accuracies)."""
    torch.manual_seed(seed)
    model = TransformerClassifier(config).to(run.device)
    train_ids, train_labels = classifier_tensors(run, run.data.train_cls, config.block_size)
    test_ids, test_labels = classifier_tensors(run, run.data.test_cls, config.block_size)
    validation = None
    if training.validation_fraction > 0:  # the same split for every seed: it depends on the data only
        kept, held_out = stratified_split(run.data.train_cls.labels, training.validation_fraction, seed=0)
        validation = (train_ids[held_out], train_labels[held_out])
        train_ids, train_labels = train_ids[kept], train_labels[kept]
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_ids) / training.batch_size)

    def batches():
        while True:
            for index in shuffled_batches(len(train_ids), training.batch_size, generator):
                yield train_ids[index], train_labels[index]

    def evaluate(step, epoch_steps):
        # train loss and accuracy are running figures over the epoch's batches (free, unlike a second pass)
        losses, correct, count = zip(*epoch_steps)
        row = {"epoch": step // steps_per_epoch, "train_loss": sum(losses) / len(losses),
               "train_accuracy": 100.0 * sum(correct) / sum(count),
               "test_accuracy": accuracy(predict(model, test_ids, run.device), test_labels)}
        if validation is not None:
            row["validation_accuracy"] = accuracy(predict(model, validation[0], run.device), validation[1])
            row["validation_score"] = -row["validation_accuracy"]
        log(f"{row['epoch']:>5} | {row['train_loss']:>10.4f} | {row['train_accuracy']:>9.2f}% | {row['test_accuracy']:>8.2f}%"
            + (f" | {row['validation_accuracy']:>8.2f}%" if validation is not None else ""))
        return row

    log("epoch | train loss | train acc | test acc" + (" | val acc" if validation is not None else ""))
    started = time.perf_counter()
    stop_after = training.stop_after * steps_per_epoch if training.stop_after else None
    epochs = fit(model, batches(), training.epochs * steps_per_epoch, steps_per_epoch, evaluate, training, run.device,
                 stop_after=stop_after)
    seconds = time.perf_counter() - started
    if validation is not None and training.refit:
        chosen = best_evaluation(epochs)["epoch"]
        log(f"validation chose {chosen} epochs: retraining on the whole training file")
        refit = replace(training, stop_after=chosen, validation_fraction=0.0, refit=False)
        model, report = train_classifier(run, config, refit, seed, log)
        report.update(selection_epochs=epochs, chosen_epochs=chosen, train_seconds=seconds + report["train_seconds"])
        return model, report
    report = {"num_parameters": count_parameters(model), "epochs": epochs,
              **classifier_report(run, predict(model, test_ids, run.device)), "train_seconds": seconds}
    return model, report


# ---------------------------------------------------------------- language model


@torch.no_grad()
def negative_log_likelihood(model, stream: torch.Tensor, block_size: int, device, batch_size: int = 128):
    """Summed cross-entropy (nats) over every token of `stream` after the first, in consecutive windows,
    and the number of tokens scored."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in consecutive_windows(stream, block_size):
        for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
            logits = model(x.to(device)).logits
            total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
            count += y.numel()
    return total, count


def perplexity(model, stream: torch.Tensor, block_size: int, device) -> float:
    """Per-token perplexity: exp of the mean cross-entropy over every token after the first."""
    total, count = negative_log_likelihood(model, stream, block_size, device)
    return math.exp(total / count)


def word_perplexity(run: Run, model, text: str, block_size: int) -> float:
    """Word-level perplexity: the file's total NLL over its word count (minus the unscored first word),
    comparable across tokenizers; for the word tokenizer it equals the per-token figure."""
    total, _ = negative_log_likelihood(model, encode_stream(run, text), block_size, run.device)
    return math.exp(total / (len(run.words.split(text)) - 1))


def encode_stream(run: Run, text: str) -> torch.Tensor:
    """Token ids of a whole text as one 1-D stream."""
    return torch.tensor(run.tokenizer.encode(text), dtype=torch.long)


def train_language_model(run: Run, config: TransformerConfig, training: TrainingConfig, seed: int, log=print,
                         build_model=None):
    """Train the decoder on train_LM.txt; return the model and its report (perplexity every eval_interval).
    build_model(config, train_stream), if given, makes another decoder (novel.py's needs the training stream)."""
    torch.manual_seed(seed)
    train_text, validation_text = split_lines(run.data.train_lm, training.validation_fraction)
    train_stream = encode_stream(run, train_text)
    model = (build_model(config, train_stream) if build_model else TransformerLM(config)).to(run.device)
    validation_stream = encode_stream(run, validation_text) if validation_text else None
    test_streams = {name: encode_stream(run, text) for name, text in run.data.test_lm.items()}
    if len(train_stream) <= config.block_size:
        raise DataError(f"train_LM.txt has {len(train_stream)} tokens, fewer than block_size + 1")
    generator = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield random_windows(train_stream, config.block_size, training.batch_size, generator)

    def evaluate(step, recent_steps):
        row = {"iteration": step, "train_loss": sum(loss for loss, _, _ in recent_steps) / len(recent_steps),
               "train_perplexity": perplexity(model, train_stream, config.block_size, run.device),
               "perplexity": {name: perplexity(model, stream, config.block_size, run.device)
                              for name, stream in test_streams.items()}}
        if validation_stream is not None:
            row["validation_perplexity"] = perplexity(model, validation_stream, config.block_size, run.device)
            row["validation_score"] = row["validation_perplexity"]
        if run.args.tokenizer != "word":  # per-token perplexities of different tokenizers are not comparable
            row["word_perplexity"] = {name: word_perplexity(run, model, text, config.block_size)
                                      for name, text in run.data.test_lm.items()}
        log(f"{step:>9} | {row['train_perplexity']:>9.2f} | " + " | ".join(f"{v:>8.2f}" for v in row["perplexity"].values())
            + (f" | {row['validation_perplexity']:>8.2f}" if validation_stream is not None else ""))
        return row

    log("iteration | train ppl |    obama |    wbush |    hbush" + (" |  val ppl" if validation_stream is not None else ""))
    started = time.perf_counter()
    evals = fit(model, batches(), training.max_iters, training.eval_interval, evaluate, training, run.device,
                count_correct=False, stop_after=training.stop_after)
    report = {"num_parameters": count_parameters(model), "evals": evals, "train_seconds": time.perf_counter() - started}
    if validation_stream is not None and training.refit:
        chosen = best_evaluation(evals)["iteration"]
        log(f"validation chose {chosen} iterations: retraining on the whole of train_LM.txt")
        refit = replace(training, stop_after=chosen, eval_interval=chosen, validation_fraction=0.0, refit=False)
        model, final = train_language_model(run, config, refit, seed, log, build_model)
        report.update(final=final["final"], best_iteration=chosen, refit=True,
                      train_seconds=report["train_seconds"] + final["train_seconds"])
    elif validation_stream is not None:  # the restored best model, evaluated once more
        best = best_evaluation(evals)
        report["best_iteration"] = best["iteration"]
        report["final"] = {"validation_perplexity": best["validation_perplexity"],
                           "perplexity": {name: perplexity(model, stream, config.block_size, run.device)
                                          for name, stream in test_streams.items()}}
    else:
        report["final"] = {"perplexity": evals[-1]["perplexity"]}
    return model, report
