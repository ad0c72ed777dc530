"""Training and evaluation shared by every part: configs, presets, one train loop, accuracy and perplexity.

Split from main.py so that the command line stays a thin shell and the studies can reuse the same
functions; nothing here knows about argparse.
"""

import contextlib
import copy
import hashlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset import (
    TEST_LM,
    TRAIN_CLS,
    TRAIN_LM,
    DataError,
    EpochBatches,
    LabelledSegments,
    Speeches,
    WindowBatches,
    consecutive_windows,
    encode_segments,
    load_speeches,
    overlap_flags,
    split_lines,
    stratified_split,
)
from runtime import corpus
from runtime import parallel as data_parallel
from runtime.corpus import DEFAULT_CACHE
from runtime.parallel import SINGLE, Parallel
from runtime.progress import StepLogger
from runtime.resume import STATE_FILE, Checkpointer, StopRequest, TrainingInterrupted, identity
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
    # split each batch into this many micro-batches, one forward and backward each, then one optimiser step:
    # the same gradient (within float rounding) in less memory; batch_size stays the batch of each step
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16: the dtype autocast gives the training forward pass
    compile: bool = False  # torch.compile the training steps (pays for long runs only: docs/training.md)

    def validate(self) -> "TrainingConfig":
        for name in ("batch_size", "epochs", "max_iters", "eval_interval", "stop_after", "grad_accum"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(f"validation fraction must be in [0, 0.5), got {self.validation_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        return self


# --precision -> the autocast dtype; fp32 runs without autocast, exactly as before
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device):
    """Raise ValueError (one line) for a precision the device cannot train in."""
    if precision == "fp16" and device.type != "cuda":
        # float16 needs a gradient scaler, and most CPUs have no native float16 arithmetic: CUDA only
        raise ValueError(f"--precision fp16 needs a CUDA device, not {device.type}; use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")


def autocast(device: torch.device, precision: str):
    """The autocast context of a training forward pass; a no-op context for fp32."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class Preset:
    """Changes from the course base model and training, per task."""

    classifier: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    lm: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))


# Named presets, in one place. "best" was chosen on validation splits only (docs/improvement.md).
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
    # fine-tuning a pretrained model (--init-from, studies/transfer.py): the sizes come from the checkpoint; a lower
    # rate, and validation chooses where to stop: the language model's short schedule, since a few passes over
    # train_LM.txt already move it far; the classifier's 20 epochs, whose best epoch on validation was above every
    # epoch of a 6-epoch schedule, for the decoder's trunk and the MLM encoder alike (docs/transfer.md)
    "finetune": Preset(
        classifier=({"init_std": 0.02, "dropout": 0.1, "label_smoothing": 0.1, "attention": "sdpa"},
                    {"batch_size": 32, "learning_rate": 3e-4, "weight_decay": 0.01, "epochs": 20, "warmup_steps": 30,
                     "cosine_decay": True, "validation_fraction": 0.1, "refit": True}),
        lm=({"init_std": 0.02, "dropout": 0.2, "block_size": 128, "attention": "sdpa"},
            {"batch_size": 32, "learning_rate": 3e-4, "weight_decay": 0.1, "max_iters": 60, "eval_interval": 6,
             "warmup_steps": 10, "cosine_decay": True, "validation_fraction": 0.1, "refit": True}),
    ),
}


MODEL_FLAGS = ("block_size", "n_embd", "n_head", "n_layer", "ff_hidden")  # the sizes a command line may set
TRAINING_FLAGS = ("batch_size", "learning_rate", "epochs", "max_iters", "eval_interval", "grad_accum")


@dataclass
class RunSettings:
    """What a command's Run is built from (make_run's keywords); plain values, so a worker process rebuilds the same Run."""

    data_dir: Path | None = None  # None: speechesdataset/ if it holds the six files, else `corpus`
    corpus: str = "auto"  # auto | course | sotu-standin | sotu-all (runtime/corpus.py)
    cache_dir: Path = DEFAULT_CACHE  # where built corpora are kept
    out: Path = Path("results")  # JSON, plots and heatmaps
    device: str = "auto"  # auto: CUDA if present, else CPU
    tokenizer: str = "word"  # word (the course's) | bpe
    bpe_vocab: int = 2000
    preset: str = "base"  # PRESETS: base is the course's model and training
    model_flags: dict = field(default_factory=dict)  # MODEL_FLAGS set on top of the preset
    training_flags: dict = field(default_factory=dict)  # TRAINING_FLAGS set on top of the preset
    precision: str = "fp32"  # how to run the training, not what it computes: no preset sets these two
    compile: bool = False
    plots: bool = True  # PNG figures and attention heatmaps

    def validate(self) -> "RunSettings":
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for given, allowed in ((self.model_flags, MODEL_FLAGS), (self.training_flags, TRAINING_FLAGS)):
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"unknown option {unknown[0]!r}; choose from {', '.join(allowed)}")
        return self


@dataclass
class Run:
    """What every part needs: its settings, the data and tokenizer read once, the device."""

    settings: RunSettings
    data: Speeches
    tokenizer: WordTokenizer | ByteBPETokenizer
    device: torch.device
    words: WordTokenizer  # counts words for word-level perplexity, whatever the model's tokenizer
    parallel: Parallel = SINGLE  # this process among torchrun's data parallel processes
    extra_tests: dict = field(default_factory=dict)  # --extra-test file name -> its contents, read before training

    @property
    def out(self) -> Path:
        """The output folder."""
        return self.settings.out

    @property
    def heatmap_dir(self) -> Path | None:
        """Where attention heatmaps go; None without plots."""
        return self.out / "attention" if self.settings.plots else None


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


def make_run(*, log=print, **settings) -> Run:
    """build_run of RunSettings(**settings): the library's keyword entry point."""
    return build_run(RunSettings(**settings), log)


def build_run(settings: RunSettings, log=print) -> Run:
    """Read the data and build the vocabulary once for a whole command; `log` says which data."""
    settings = settings.validate()
    device = resolve_device(settings.device)
    check_precision(settings.precision, device)
    data = load_speeches(corpus.locate(settings.data_dir, settings.corpus, settings.cache_dir, log))
    words = WordTokenizer.from_texts(data.vocabulary_texts(), data.vocabulary_cap)
    tokenizer = (words if settings.tokenizer == "word"
                 else ByteBPETokenizer.from_texts(data.vocabulary_texts(), settings.bpe_vocab))
    return Run(settings, data, tokenizer, device, words)


def model_config(run: Run, task: str, preset: str | None = None, **changes) -> TransformerConfig:
    """The course base model, then the preset's changes for `task` (default: the run's preset), the size flags
    given, then `changes`."""
    preset = getattr(PRESETS[preset or run.settings.preset], task)[0]
    config = TransformerConfig(vocab_size=run.tokenizer.vocab_size, n_classes=len(run.data.class_names))
    return replace(config, **{**preset, **run.settings.model_flags, **changes}).validate()


def training_config(run: Run, task: str, preset: str | None = None) -> TrainingConfig:
    """The course training, then the preset's changes for `task` (default: the run's preset), then the training
    flags given and how to run it (precision, compile)."""
    preset = getattr(PRESETS[preset or run.settings.preset], task)[1]
    return replace(TrainingConfig(), **{**preset, **run.settings.training_flags, "precision": run.settings.precision,
                                        "compile": run.settings.compile}).validate()


REFIT_FOLDER = "refit"  # inside a selection run's checkpoint folder: the refit's checkpoints


@dataclass
class Harness:
    """How a training runs, never what it learns: checkpoints, progress and logs, data parallel processes."""

    name: str = "training"  # names its log file and progress bar
    checkpoint_dir: Path | None = None  # None: no checkpoints, and Ctrl-C stops as it always did
    checkpoint_every: int = 0  # steps; 0: a checkpoint only when stopped by SIGINT or SIGTERM
    resume: Path | None = None  # a checkpoint folder to continue from
    log_dir: Path | None = None
    progress_bar: bool = False
    parallel: Parallel = SINGLE
    identity: dict = field(default_factory=dict)  # what a checkpoint must match (set by the train_* functions)
    command_checkpoint: Path | None = None  # the folder --resume takes for the whole command (None: checkpoint_dir)
    save_last: bool = False  # also a checkpoint of the last step: a selection run's, which its refit resumes after

    def for_refit(self, name: str) -> "Harness":
        """The harness of the refit that follows a selection run in the same command: its checkpoints go to a
        `refit` folder inside the selection's, and it resumes from the resumed folder's `refit` when there is one
        (otherwise the refit starts afresh after the selection, which resumes from its own checkpoint)."""
        resume = self.resume / REFIT_FOLDER if self.resume is not None else None
        return replace(self, name=name, checkpoint_dir=self.checkpoint_dir and self.checkpoint_dir / REFIT_FOLDER,
                       resume=resume if resume is not None and (resume / STATE_FILE).is_file() else None,
                       command_checkpoint=self.command_checkpoint or self.checkpoint_dir)


def run_identity(run: Run, task: str, config: TransformerConfig, training: TrainingConfig, seed: int, data: str,
                 harness: Harness) -> dict:
    """The configuration, data and process count a checkpoint of this training must match."""
    return identity(task=task, model=config.to_dict(), training=asdict(training), seed=seed,
                    tokenizer={"kind": type(run.tokenizer).__name__, "vocab_size": run.tokenizer.vocab_size},
                    data=hashlib.sha256(data.encode("utf-8")).hexdigest()[:16], processes=harness.parallel.world_size)


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


@dataclass
class LoopState:
    """Where fit() stands: what a checkpoint keeps besides the model, optimiser, schedule and data order."""

    step: int = 0
    history: list = field(default_factory=list)  # evaluation rows
    running: list = field(default_factory=list)  # (loss, correct, targets) of each step since the last evaluation
    best: tuple | None = None  # (validation score, state_dict) of the best evaluation so far


def train_step(trainer, optimizer, scaler, inputs, targets, training: TrainingConfig, parallel: Parallel, device,
               count_correct: bool) -> tuple[float, int, int]:
    """One optimiser step on a batch: this process's share of it in training.grad_accum micro-batches, each loss
    weighted by its share of the batch's targets so that the gradients add up to the whole batch's mean, each
    forward pass under training.precision's autocast; returns this process's share of the batch's mean loss, and
    its correct argmax predictions and targets."""
    total = targets.numel()
    pieces = list(zip(data_parallel.micro_batches(inputs, parallel, training.grad_accum),
                      data_parallel.micro_batches(targets, parallel, training.grad_accum)))
    optimizer.zero_grad(set_to_none=True)
    loss_sum, correct, count = 0.0, 0, 0
    for index, (x, y) in enumerate(pieces):
        share, count = y.numel() / total, count + y.numel()
        if share == 0:  # fewer rows than micro-batches: a row that adds nothing keeps every process's passes in step
            x, y = inputs[:1], targets[:1]
        x, y = x.to(device), y.to(device)
        with data_parallel.no_sync(trainer, sync=index == len(pieces) - 1):
            with autocast(torch.device(device), training.precision):
                output = trainer(x, y)
            # an argmax over the decoder's (B, T, vocabulary) logits costs ~7% of its step: only when asked for
            if count_correct and share:
                correct += (output.logits.detach().argmax(-1) == y).sum().item()
            # the backward pass does not need the logits: freeing them first keeps the decoder's step from holding
            # two (B, T, vocabulary) arrays at once (0.35 M of part two's 4.05 M page faults without keep_freed_memory)
            loss, output = output.loss, None
            weight = share * parallel.world_size  # DDP averages the processes' gradients; this undoes the division
            scaler.scale(loss if weight == 1 else loss * weight).backward()
        loss_sum += share * loss.item()
    scaler.step(optimizer)
    scaler.update()
    return loss_sum, correct, count


def record_evaluation(state: LoopState, model, evaluate, logger: StepLogger, parallel: Parallel):
    """Process 0 evaluates (the others wait for its row, so no work is duplicated); keep the best weights."""
    model.eval()
    row = None
    if parallel.is_main:
        with logger.printing():
            row = evaluate(state.step, state.running)
    row = data_parallel.from_main(row, parallel)
    state.history.append(row)
    logger.evaluation(state.step, row)
    score = row.get("validation_score")
    if score is not None and (state.best is None or score < state.best[0]):
        state.best = (score, copy.deepcopy(model.state_dict()))
    state.running = []
    model.train()


def compiled(trainer, device, parallel: Parallel):
    """torch.compile of the training forward pass; on one CUDA device in "reduce-overhead" mode (CUDA graphs),
    since a course-size step there spends ~90% of its time launching ~480 small kernels (docs/training.md)."""
    graphs = torch.device(device).type == "cuda" and parallel.world_size == 1  # DDP's hooks stay out of graphs
    return torch.compile(trainer, mode="reduce-overhead" if graphs else None)


def fit(model, batches, steps: int, eval_every: int, evaluate, training: TrainingConfig, device,
        count_correct: bool = True, stop_after: int | None = None, harness: Harness | None = None,
        patience: int | None = None) -> list[dict]:
    """Train for `steps` batches (or the first `stop_after` of them, under the schedule planned for `steps`);
    every `eval_every` steps and at the last, call evaluate(step, steps_since_last_eval),
    where each step is (loss, number of correct argmax predictions or 0 without count_correct, number of targets).
    If evaluate's rows carry "validation_score" (lower is better), the best model is restored at the end; with
    `patience`, training also ends once that many evaluations in a row have not bettered the best (early stopping).
    The harness adds checkpoints (and resuming), progress and logs, and data parallel processes."""
    harness = harness or Harness()
    parallel = harness.parallel
    optimizer, schedule = make_optimizer(model, training, steps)
    trainer = data_parallel.wrap(model, parallel)
    # fp16 alone needs loss scaling: its gradients underflow; bf16 keeps fp32's exponent range. Disabled, it is a pass-through.
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=training.precision == "fp16")
    forward = compiled(trainer, device, parallel) if training.compile else trainer  # evaluation stays eager
    state = LoopState()
    checkpointer, components = None, {"model": model, "optimizer": optimizer, "schedule": schedule, "batches": batches}
    if harness.checkpoint_dir is not None or harness.resume is not None:  # without a folder of its own, it writes back
        directory = harness.checkpoint_dir or harness.resume
        checkpointer = Checkpointer(directory, harness.checkpoint_every, harness.identity, parallel)
    if harness.resume is not None:
        step, progress = checkpointer.load(harness.resume, components)
        state = LoopState(step, **progress)
    last = min(steps, stop_after or steps)
    if harness.resume is not None and parallel.is_main:
        print(f"resuming from {harness.resume} after step {state.step} of {last}")
    show_bar = harness.progress_bar and parallel.is_main
    log_dir = harness.log_dir if parallel.is_main else None
    model.train()
    with StopRequest(checkpointer is not None, parallel.is_main) as stop, \
            StepLogger(last, state.step, log_dir, harness.name, show_bar) as logger:
        for step in range(state.step + 1, last + 1):
            inputs, targets = next(batches)
            learning_rate = optimizer.param_groups[0]["lr"]
            loss, correct, count = train_step(forward, optimizer, scaler, inputs, targets, training, parallel, device,
                                               count_correct)
            schedule.step()
            # one collective per step: the step's figures over all processes, and whether any was asked to stop
            loss, correct, count, stopping = data_parallel.all_sum([loss, correct, count, stop.requested], parallel)
            state.step = step
            state.running.append((loss, int(correct), int(count)))
            logger.step(step, loss, learning_rate)
            if step % eval_every == 0 or step == last:
                record_evaluation(state, model, evaluate, logger, parallel)
                if patience is not None and evaluations_since_best(state.history) >= patience:
                    break
            if checkpointer is not None and (stopping or checkpointer.due(step) or (harness.save_last and step == last)):
                progress = {"history": state.history, "running": state.running, "best": state.best}
                checkpointer.save(step, components, progress)
            if stopping and step < last:  # at the last step the run may as well finish
                raise TrainingInterrupted(stop.signal_number or signal.SIGINT, step, last,
                                          harness.command_checkpoint or checkpointer.directory)
    model.eval()
    if state.best is not None:  # early stopping: the weights of the best validation evaluation
        model.load_state_dict(state.best[1])
    return state.history


def evaluations_since_best(history: list[dict]) -> int:
    """How many evaluations have come after the best one (0: the last is the best)."""
    scores = [row["validation_score"] for row in history]
    return len(scores) - 1 - scores.index(min(scores))


def best_evaluation(history: list[dict]) -> dict:
    """The first evaluation row with the lowest validation_score: the one fit() restores."""
    return min(history, key=lambda row: row["validation_score"])


@dataclass
class TrainResult:
    """What either trainer returns: the model, its evaluation rows, and the figures of that model."""

    model: torch.nn.Module
    num_parameters: int
    unit: str  # what a row counts: "epoch" (classifier) or "iteration" (language model)
    history: list[dict]  # one row per evaluation
    final: dict  # the returned model's figures, and "model": which model that is
    train_seconds: float
    chosen: int | None = None  # the epoch or iteration validation chose (None: no validation split)
    selection: list[dict] | None = None  # a refit's selection run: its rows, with validation

    def report(self) -> dict:
        """Everything but the model, for the JSON."""
        report = {"num_parameters": self.num_parameters, "history": self.history, "final": self.final,
                  "train_seconds": self.train_seconds}
        if self.chosen is not None:
            report["chosen"] = self.chosen
        if self.selection is not None:
            report["selection"] = self.selection
        return report


def refit_after(selection: TrainResult, training: "TrainingConfig", retrain, data_name: str, log=print) -> TrainResult:
    """Select-then-refit: retrain(refit settings) from scratch on the whole training file, under the same schedule,
    for the epochs or iterations that the selection run's validation chose."""
    chosen = best_evaluation(selection.history)[selection.unit]
    log(f"validation chose {chosen} {selection.unit}s: retraining on all of {data_name}")
    final = retrain(replace(training, stop_after=chosen, validation_fraction=0.0, refit=False))
    final.final["model"] = f"retrained on all of {data_name} for the {chosen} {selection.unit}s validation chose"
    return replace(final, chosen=chosen, selection=selection.history,
                   train_seconds=selection.train_seconds + final.train_seconds)


# ---------------------------------------------------------------- classifier


@torch.no_grad()
def predict(model, ids: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities of each row of ids."""
    model.eval()
    return torch.cat([model(chunk.to(device)).logits.softmax(-1).cpu() for chunk in ids.split(batch_size)])


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor, where=None) -> float | None:
    """Percent correct argmax predictions, over the rows selected by the boolean `where` (all by default); None
    when no row is selected (null in the JSON, left out of the printed lines)."""
    if where is not None:
        probabilities, labels = probabilities[where], labels[where]
    return 100.0 * (probabilities.argmax(-1) == labels).float().mean().item() if len(labels) else None


def classifier_tensors(run: Run, segments: LabelledSegments, block_size: int):
    """(N, block_size) padded ids and (N,) labels."""
    return encode_segments(run.tokenizer, segments.texts, block_size), torch.tensor(segments.labels)


def test_splits(run: Run) -> dict[str, torch.Tensor]:
    """Boolean masks over the test segments: text seen in train_CLS.tsv, unseen, and in neither training file."""
    flags = overlap_flags(run.data)
    seen = torch.tensor(flags["in_train_cls"], dtype=torch.bool)
    return {"seen": seen, "unseen": ~seen, "unseen_both": torch.tensor(flags["in_neither"], dtype=torch.bool)}


def classifier_report(run: Run, probabilities: torch.Tensor) -> dict:
    """Test accuracy overall and on the seen / unseen / in-neither-training-file segments."""
    labels = torch.tensor(run.data.test_cls.labels)
    splits = test_splits(run)
    report = {"test_accuracy": accuracy(probabilities, labels)}
    for name, where in splits.items():
        report[f"test_accuracy_{name}"] = accuracy(probabilities, labels, where)
        report[f"num_test_{name}"] = int(where.sum())
    return report


def train_classifier(run: Run, config: TransformerConfig, training: TrainingConfig, seed: int, log=print,
                     harness: Harness | None = None, build_model=None, wrap_batches=None,
                     patience: int | None = None, extra=None) -> TrainResult:
    """Train the encoder classifier: its per-epoch rows, and the test accuracies of the model returned.
    The studies' hooks: wrap_batches(batches, seed) changes the training batches (dataset.token_dropout's); patience
    stops a run with a validation split early (fit's, counted in epochs); extra(indices) gives more (text, label)
    training examples for a fit on the train_CLS segments `indices` (dataset.speaker_blocks'), never validation's.
    build_model(config), if given, makes the classifier (pretraining.py's starts from a pretrained encoder)."""
    torch.manual_seed(seed)
    model = (build_model(config) if build_model else TransformerClassifier(config)).to(run.device)
    train_ids, train_labels = classifier_tensors(run, run.data.train_cls, config.block_size)
    test_ids, test_labels = classifier_tensors(run, run.data.test_cls, config.block_size)
    validation, kept = None, torch.arange(len(train_labels))
    if training.validation_fraction > 0:  # the same split for every seed: it depends on the data only
        kept, held_out = stratified_split(run.data.train_cls.labels, training.validation_fraction, seed=0)
        validation = (train_ids[held_out], train_labels[held_out])
        train_ids, train_labels = train_ids[kept], train_labels[kept]
    pairs = extra(kept.tolist()) if extra is not None else []
    more = LabelledSegments([text for text, _ in pairs], [label for _, label in pairs])
    if more.texts:  # after the segments: EpochBatches shuffles them together
        more_ids, more_labels = classifier_tensors(run, more, config.block_size)
        train_ids, train_labels = torch.cat([train_ids, more_ids]), torch.cat([train_labels, more_labels])
    batches = EpochBatches(train_ids, train_labels, training.batch_size, torch.Generator().manual_seed(seed))
    if wrap_batches is not None:
        batches = wrap_batches(batches, seed)
    steps_per_epoch = math.ceil(len(train_ids) / training.batch_size)
    harness = harness or Harness()
    data = "\n".join(f"{label}\t{text}" for label, text in zip(run.data.train_cls.labels + more.labels,
                                                               run.data.train_cls.texts + more.texts))
    harness = replace(harness, identity=run_identity(run, "classifier", config, training, seed, data, harness),
                      save_last=validation is not None and training.refit)

    latest = {}  # the latest evaluation's test probabilities: the report of the last epoch's model reuses them

    def evaluate(step, epoch_steps):
        # train loss and accuracy are running figures over the epoch's batches (free, unlike a second pass)
        losses, correct, count = zip(*epoch_steps)
        latest["test"] = predict(model, test_ids, run.device)
        row = {"epoch": step // steps_per_epoch, "train_loss": sum(losses) / len(losses),
               "train_accuracy": 100.0 * sum(correct) / sum(count),
               "test_accuracy": accuracy(latest["test"], test_labels)}
        if validation is not None:
            row["validation_accuracy"] = accuracy(predict(model, validation[0], run.device), validation[1])
            row["validation_score"] = -row["validation_accuracy"]
        log(f"{row['epoch']:>5} | {row['train_loss']:>10.4f} | {row['train_accuracy']:>9.2f}% | {row['test_accuracy']:>8.2f}%"
            + (f" | {row['validation_accuracy']:>8.2f}%" if validation is not None else ""))
        return row

    log("epoch | train loss | train acc | test acc" + (" | val acc" if validation is not None else ""))
    started = time.perf_counter()
    stop_after = training.stop_after * steps_per_epoch if training.stop_after else None
    epochs = fit(model, batches, training.epochs * steps_per_epoch, steps_per_epoch, evaluate, training, run.device,
                 stop_after=stop_after, harness=harness, patience=patience)
    seconds = time.perf_counter() - started
    if validation is not None and training.refit:
        selection = TrainResult(model, count_parameters(model), "epoch", epochs, {}, seconds)
        return refit_after(selection, training, lambda refit: train_classifier(
            run, config, refit, seed, log, harness.for_refit(f"{harness.name}_refit"), build_model, wrap_batches,
            extra=extra), TRAIN_CLS, log)
    # fit() restores the best validation evaluation's weights; without validation the model is the last evaluated
    # one, unless this process did not evaluate (a data parallel worker) or a resumed run had no step left to take
    probabilities = latest.get("test") if validation is None else None
    if probabilities is None:
        probabilities = predict(model, test_ids, run.device)
    final = classifier_report(run, probabilities)
    if extra is not None:
        final["extra_examples"] = len(more.texts)
    chosen = best_evaluation(epochs)["epoch"] if validation is not None else None
    final["model"] = (f"the best validation evaluation (epoch {chosen}), restored" if chosen is not None
                      else f"the last epoch ({epochs[-1]['epoch']})")
    return TrainResult(model, count_parameters(model), "epoch", epochs, final, seconds, chosen)


# ---------------------------------------------------------------- language model


@torch.no_grad()
def scored_windows(model, stream: torch.Tensor, block_size: int, device, batch_size: int = 16):
    """Yield (logits, targets) for every token of `stream` after the first: consecutive windows of block_size
    tokens, batch_size windows at a time; the one windowing of every perplexity and per-token NLL."""
    model.eval()
    for inputs, targets in consecutive_windows(stream, block_size):
        for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
            yield model(x.to(device)).logits, y.to(device)


def negative_log_likelihood(model, stream: torch.Tensor, block_size: int, device, batch_size: int = 16):
    """Summed cross-entropy (nats) over every token of `stream` after the first, in consecutive windows,
    and the number of tokens scored."""
    # 16 windows of the course's 32 tokens: (512, 5635) float logits, 11.5 MB, stay in cache between the head's
    # product and the cross-entropy; 128 windows (92 MB) made the evaluation about 1.8 times slower on the CPU
    total, count = 0.0, 0
    for logits, targets in scored_windows(model, stream, block_size, device, batch_size):
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total, count


def perplexity(model, stream: torch.Tensor, block_size: int, device) -> float:
    """Per-token perplexity: exp of the mean cross-entropy over every token after the first."""
    if len(stream) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(stream)}")
    total, count = negative_log_likelihood(model, stream, block_size, device)
    return math.exp(total / count)


def check_scorable(run: Run, text: str, name: str) -> str:
    """`text`, if it has a token and a word after the first to score; DataError naming `name` otherwise."""
    tokens, words = len(run.tokenizer.encode(text)), len(run.words.split(text))
    if min(tokens, words) < 2:
        raise DataError(f"{name}: {tokens} token(s), {words} word(s); perplexity needs at least 2 of each")
    return text


def word_perplexity(run: Run, model, text: str, block_size: int) -> float:
    """Word-level perplexity: the file's total NLL over its word count (minus the unscored first word),
    comparable across tokenizers; for the word tokenizer it equals the per-token figure."""
    total, _ = negative_log_likelihood(model, encode_stream(run, text), block_size, run.device)
    return math.exp(total / scored_word_count(run, text))


def scored_word_count(run: Run, text: str) -> int:
    """The words of `text` that a perplexity scores: all but the first (it has no context)."""
    return len(run.words.split(text)) - 1


def scored_words(run: Run) -> dict[str, int]:
    """Each test_LM file's scored words: the denominator of a word-level perplexity, comparable across tokenizers
    (for the word tokenizer, one token is one word and this is the count of scored tokens)."""
    return {name: scored_word_count(run, text) for name, text in run.data.test_lm.items()}


def encode_stream(run: Run, text: str) -> torch.Tensor:
    """Token ids of a whole text as one 1-D stream."""
    return torch.tensor(run.tokenizer.encode(text), dtype=torch.long)


def train_language_model(run: Run, config: TransformerConfig, training: TrainingConfig, seed: int, log=print,
                         harness: Harness | None = None, build_model=None, wrap_batches=None,
                         train_eval_tokens: int | None = None, patience: int | None = None,
                         curves: bool = True) -> TrainResult:
    """Train the decoder on train_LM.txt: its rows (perplexity every eval_interval), and the returned model's figures.
    The studies' hooks: wrap_batches(batches, train_stream, config, seed) changes the training batches
    (dataset.input_noise's); train_eval_tokens scores the train perplexity on that many first tokens only (None: all,
    as the course does; the scaling study's 1.6M-token slices would otherwise spend most of their time there);
    patience stops a run with a validation split early (fit's); curves=False scores only the validation split at each
    evaluation (all that the choice reads) and the test files and train perplexity once, on the returned model (the
    same figures: evaluation draws nothing).
    build_model(config, train_stream), if given, makes another decoder (models/novel_words.py's needs the training stream)."""
    torch.manual_seed(seed)
    train_text, validation_text = split_lines(run.data.train_lm, training.validation_fraction)
    train_stream = encode_stream(run, train_text)
    if validation_text:
        check_scorable(run, validation_text, f"the validation split of {TRAIN_LM}")
    model = (build_model(config, train_stream) if build_model else TransformerLM(config)).to(run.device)
    validation_stream = encode_stream(run, validation_text) if validation_text else None
    test_streams = {name: encode_stream(run, check_scorable(run, text, TEST_LM[name]))
                    for name, text in run.data.test_lm.items()}
    if len(train_stream) <= config.block_size:
        raise DataError(f"train_LM.txt has {len(train_stream)} tokens, fewer than block_size + 1")
    batches = WindowBatches(train_stream, config.block_size, training.batch_size, torch.Generator().manual_seed(seed))
    if wrap_batches is not None:
        batches = wrap_batches(batches, train_stream, config, seed)
    harness = harness or Harness()
    harness = replace(harness, identity=run_identity(run, "lm", config, training, seed, run.data.train_lm, harness),
                      save_last=validation_stream is not None and training.refit)

    def scores():  # the model's training and test figures
        row = {"train_perplexity": perplexity(model, train_stream[:train_eval_tokens], config.block_size, run.device),
               "perplexity": {name: perplexity(model, stream, config.block_size, run.device)
                              for name, stream in test_streams.items()}}
        if run.settings.tokenizer != "word":  # per-token perplexities of different tokenizers are not comparable
            row["word_perplexity"] = {name: word_perplexity(run, model, text, config.block_size)
                                      for name, text in run.data.test_lm.items()}
        return row

    def evaluate(step, recent_steps):
        row = {"iteration": step, "train_loss": sum(loss for loss, _, _ in recent_steps) / len(recent_steps),
               **(scores() if curves else {})}
        if validation_stream is not None:
            row["validation_perplexity"] = perplexity(model, validation_stream, config.block_size, run.device)
            row["validation_score"] = row["validation_perplexity"]
        log(f"{step:>9} | " + (f"{row['train_perplexity']:>9.2f} | " + " | ".join(
            f"{v:>8.2f}" for v in row["perplexity"].values()) if curves else f"{row['train_loss']:>9.4f} (train loss)")
            + (f" | {row['validation_perplexity']:>8.2f}" if validation_stream is not None else ""))
        return row

    log("iteration | train ppl | " + " | ".join(f"{name:>8}" for name in test_streams)
        + (" |  val ppl" if validation_stream is not None else ""))
    started = time.perf_counter()
    evals = fit(model, batches, training.max_iters, training.eval_interval, evaluate, training, run.device,
                count_correct=False, stop_after=training.stop_after, harness=harness, patience=patience)
    seconds = time.perf_counter() - started
    if validation_stream is not None and training.refit:
        # the refit keeps the evaluation interval: its own curve, and no effect on its weights (evaluation draws nothing)
        selection = TrainResult(model, count_parameters(model), "iteration", evals, {}, seconds)
        return refit_after(selection, training, lambda refit: train_language_model(
            run, config, refit, seed, log, harness.for_refit(f"{harness.name}_refit"), build_model, wrap_batches,
            train_eval_tokens, curves=curves), TRAIN_LM, log)  # the refit has no validation split to be patient with
    if validation_stream is not None:  # the restored best model: its figures are those of its evaluation
        best = best_evaluation(evals)
        best = best if curves else {**best, **scores()}
        final = final_figures(best, f"the best validation evaluation (iteration {best['iteration']}), restored")
        return TrainResult(model, count_parameters(model), "iteration", evals, final, seconds, best["iteration"])
    last = evals[-1] if curves else {**evals[-1], **scores()}
    final = final_figures(last, f"the last iteration ({last['iteration']})")
    return TrainResult(model, count_parameters(model), "iteration", evals, final, seconds)


def final_figures(row: dict, model: str) -> dict:
    """The figures of one evaluation row that describe a returned model, and which model that is."""
    keys = ("iteration", "train_perplexity", "perplexity", "word_perplexity", "validation_perplexity")
    return {**{key: row[key] for key in keys if key in row}, "model": model}
