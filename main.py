"""The course suite: python main.py --part one|two|three [options]."""

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import experiments
import utilities
from dataset import (
    DataError,
    consecutive_windows,
    encode_segments,
    load_speeches,
    random_windows,
    read_labelled_segments,
    read_text,
    shuffled_batches,
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

    def validate(self) -> "TrainingConfig":
        for name in ("batch_size", "epochs", "max_iters", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        return self


@dataclass
class Run:
    """What every part needs: options, data, tokenizer, device and output folder."""

    args: argparse.Namespace
    data: object
    tokenizer: WordTokenizer | ByteBPETokenizer
    device: torch.device
    out: Path
    words: WordTokenizer  # counts words for word-level perplexity, whatever the model's tokenizer


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


def fit(model, batches, steps: int, eval_every: int, evaluate, training: TrainingConfig, device) -> list[dict]:
    """Train for `steps` batches; every `eval_every` steps call evaluate(step, steps_since_last_eval),
    where each step is (loss, number of correct argmax predictions, number of targets)."""
    optimizer, schedule = make_optimizer(model, training, steps)
    history, running = [], []
    model.train()
    for step in range(1, steps + 1):
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        output = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        schedule.step()
        correct = (output.logits.detach().argmax(-1) == targets).sum()
        running.append((output.loss.item(), correct.item(), targets.numel()))
        if step % eval_every == 0 or step == steps:
            model.eval()
            history.append(evaluate(step, running))
            model.train()
            running = []
    model.eval()
    return history


# ---------------------------------------------------------------- classifier


@torch.no_grad()
def predict(model, ids: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Predicted class of each row of ids."""
    model.eval()
    return torch.cat([model(chunk.to(device)).logits.argmax(-1).cpu() for chunk in ids.split(batch_size)])


def accuracy(predicted: torch.Tensor, labels: torch.Tensor, where=None) -> float:
    """Percent correct, over the rows selected by the boolean `where` (all rows by default)."""
    if where is not None:
        predicted, labels = predicted[where], labels[where]
    return 100.0 * (predicted == labels).float().mean().item() if len(labels) else float("nan")


def classifier_tensors(run: Run, segments, block_size: int):
    """(N, block_size) padded ids and (N,) labels."""
    return encode_segments(run.tokenizer, segments.texts, block_size), torch.tensor(segments.labels)


def train_classifier(run: Run, config: TransformerConfig, training: TrainingConfig, seed: int, log=print):
    """Train the encoder classifier; return the model and its report (per-epoch table, accuracies)."""
    torch.manual_seed(seed)
    model = TransformerClassifier(config).to(run.device)
    train_ids, train_labels = classifier_tensors(run, run.data.train_cls, config.block_size)
    test_ids, test_labels = classifier_tensors(run, run.data.test_cls, config.block_size)
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
        log(f"{row['epoch']:>5} | {row['train_loss']:>10.4f} | {row['train_accuracy']:>9.2f}% | {row['test_accuracy']:>8.2f}%")
        return row

    log("epoch | train loss | train acc | test acc")
    started = time.perf_counter()
    epochs = fit(model, batches(), training.epochs * steps_per_epoch, steps_per_epoch, evaluate, training, run.device)
    seconds = time.perf_counter() - started
    predicted = predict(model, test_ids, run.device)
    train_texts = set(run.data.train_cls.texts)
    seen = torch.tensor([text in train_texts for text in run.data.test_cls.texts])
    report = {"num_parameters": count_parameters(model), "epochs": epochs,
              "test_accuracy": accuracy(predicted, test_labels),
              "test_accuracy_seen": accuracy(predicted, test_labels, seen),
              "test_accuracy_unseen": accuracy(predicted, test_labels, ~seen),
              "num_test_seen": int(seen.sum()), "num_test_unseen": int((~seen).sum()),
              "train_seconds": seconds}
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
    return torch.tensor(run.tokenizer.encode(text), dtype=torch.long)


def train_language_model(run: Run, config: TransformerConfig, training: TrainingConfig, seed: int, log=print):
    """Train the decoder on train_LM.txt; return the model and its report (perplexity every eval_interval)."""
    torch.manual_seed(seed)
    model = TransformerLM(config).to(run.device)
    train_stream = encode_stream(run, run.data.train_lm)
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
        if run.args.tokenizer != "word":  # per-token perplexities of different tokenizers are not comparable
            row["word_perplexity"] = {name: word_perplexity(run, model, text, config.block_size)
                                      for name, text in run.data.test_lm.items()}
        log(f"{step:>9} | {row['train_perplexity']:>9.2f} | " + " | ".join(f"{v:>8.2f}" for v in row["perplexity"].values()))
        return row

    log("iteration | train ppl |    obama |    wbush |    hbush")
    started = time.perf_counter()
    evals = fit(model, batches(), training.max_iters, training.eval_interval, evaluate, training, run.device)
    report = {"num_parameters": count_parameters(model), "evals": evals,
              "train_seconds": time.perf_counter() - started}
    return model, report


# ---------------------------------------------------------------- attention sanity checks


def attention_check(run: Run, model, text: str, causal: bool, prefix: str, save: bool = True) -> list[str]:
    """Run one sentence through the model, check every attention map, save the heatmaps."""
    block_size = model.config.block_size
    ids = run.tokenizer.encode(text)[:block_size]
    tokens = [run.tokenizer.itos[i] for i in ids]
    if not causal:  # pad the encoder's input so the padding mask is exercised too
        padded = ids + [model.config.pad_id] * (block_size - len(ids))
        inputs = torch.tensor([padded])
    else:
        inputs = torch.tensor([ids])
    with torch.no_grad():
        attentions = model(inputs.to(run.device), return_attention=True).attentions
    key_mask = inputs != model.config.pad_id if not causal else None
    if not causal and model.config.pooling == "cls":
        key_mask = torch.cat([torch.ones(1, 1, dtype=torch.bool), key_mask], dim=1)
        tokens = ["[CLS]"] + tokens
    failures = utilities.check_attention([a.cpu() for a in attentions], causal, key_mask)
    if save and not run.args.no_plots:
        utilities.save_attention_heatmaps(attentions, tokens, run.out / "attention", prefix)
    return [f"{prefix}: {failure}" for failure in failures]


# ---------------------------------------------------------------- the parts


def model_config(run: Run, **changes) -> TransformerConfig:
    """The course base model with the sizes from the command line, then `changes`."""
    args = run.args
    config = TransformerConfig(vocab_size=run.tokenizer.vocab_size, block_size=args.block_size, n_embd=args.n_embd,
                               n_head=args.n_head, n_layer=args.n_layer, ff_hidden=args.ff_hidden)
    return replace(config, **changes).validate()


def training_config(run: Run) -> TrainingConfig:
    args = run.args
    return TrainingConfig(batch_size=args.batch_size, learning_rate=args.learning_rate, epochs=args.epochs,
                          max_iters=args.max_iters, eval_interval=args.eval_interval).validate()


def extra_accuracy(run: Run, model) -> dict:
    """Accuracy on each --extra-test TSV."""
    results = {}
    for path in run.args.extra_test:
        ids, labels = classifier_tensors(run, read_labelled_segments(path), model.config.block_size)
        results[Path(path).name] = accuracy(predict(model, ids, run.device), labels)
    return results


def extra_perplexity(run: Run, model) -> dict:
    """Perplexity on each --extra-test text file."""
    return {Path(path).name: perplexity(model, encode_stream(run, read_text(path)), model.config.block_size, run.device)
            for path in run.args.extra_test}


def part_one(run: Run) -> tuple[dict, list[str]]:
    """Encoder + classifier: per-epoch table, final, seen and unseen test accuracy."""
    model, report = train_classifier(run, model_config(run), training_config(run), run.args.seed)
    failures = attention_check(run, model, run.data.test_cls.texts[0], causal=False, prefix="part1_encoder")
    result = {"vocab_size": run.tokenizer.vocab_size, "tokenizer": run.args.tokenizer, **report,
              "extra": extra_accuracy(run, model)}
    print(f"parameters: {report['num_parameters']:,}   vocabulary: {run.tokenizer.vocab_size:,}")
    print(f"test accuracy: {report['test_accuracy']:.2f}%   on segments seen in train_CLS.tsv "
          f"({report['num_test_seen']}): {report['test_accuracy_seen']:.2f}%   unseen ({report['num_test_unseen']}): "
          f"{report['test_accuracy_unseen']:.2f}%")
    for name, value in result["extra"].items():
        print(f"accuracy on {name}: {value:.2f}%")
    if not run.args.no_plots:
        epochs = [row["epoch"] for row in report["epochs"]]
        utilities.plot_curves({name: (epochs, [row[key] for row in report["epochs"]])
                               for name, key in (("train", "train_accuracy"), ("test", "test_accuracy"))},
                              "epoch", "accuracy (%)", "Part one: classifier accuracy", run.out / "part_one_accuracy.png")
    return result, failures


def plot_perplexities(run: Run, reports: dict, path: Path, title: str):
    """Test perplexity against iteration, one line per model and test file."""
    series = {}
    for model_name, report in reports.items():
        iterations = [row["iteration"] for row in report["evals"]]
        series[f"{model_name} train"] = (iterations, [row["train_perplexity"] for row in report["evals"]])
        for test in report["evals"][0]["perplexity"]:
            series[f"{model_name} {test}"] = (iterations, [row["perplexity"][test] for row in report["evals"]])
    utilities.plot_curves(series, "iteration", "perplexity", title, path, log_y=True)


def part_two(run: Run) -> tuple[dict, list[str]]:
    """Decoder language model: perplexity every eval_interval iterations."""
    model, report = train_language_model(run, model_config(run), training_config(run), run.args.seed)
    failures = attention_check(run, model, run.data.test_lm["obama"], causal=True, prefix="part2_decoder")
    result = {"vocab_size": run.tokenizer.vocab_size, "tokenizer": run.args.tokenizer, **report,
              "extra": extra_perplexity(run, model)}
    print(f"parameters: {report['num_parameters']:,}   vocabulary: {run.tokenizer.vocab_size:,} ({run.args.tokenizer})")
    if "word_perplexity" in report["evals"][-1]:
        print("word-level perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in report["evals"][-1]["word_perplexity"].items()))
    for name, value in result["extra"].items():
        print(f"perplexity on {name}: {value:.2f}")
    if not run.args.no_plots:
        plot_perplexities(run, {"decoder": report}, run.out / "part_two_perplexity.png", "Part two: decoder perplexity")
    return result, failures


def part_three(run: Run) -> tuple[dict, list[str]]:
    """ALiBi against learned absolute positions, for the decoder and the classifier, same seed and batches."""
    training, seed = training_config(run), run.args.seed
    result, failures = {"lm": {}, "classifier": {}}, []
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== decoder, {name} positions")
        model, report = train_language_model(run, model_config(run, position=position), training, seed)
        failures += attention_check(run, model, run.data.test_lm["obama"], causal=True, prefix=f"part3_decoder_{name}")
        result["lm"][name] = {"vocab_size": run.tokenizer.vocab_size, **report, "extra": extra_perplexity(run, model)}
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== classifier, {name} positions")
        model, report = train_classifier(run, model_config(run, position=position), training, seed)
        failures += attention_check(run, model, run.data.test_cls.texts[0], causal=False, prefix=f"part3_encoder_{name}")
        result["classifier"][name] = {key: report[key] for key in
                                      ("num_parameters", "test_accuracy", "test_accuracy_seen", "test_accuracy_unseen")}
        result["classifier"][name]["extra"] = extra_accuracy(run, model)
    print_part_three_table(result)
    if not run.args.no_plots:
        plot_perplexities(run, result["lm"], run.out / "part_three_perplexity.png", "Part three: absolute vs ALiBi")
    if run.args.explore:
        result["exploration"], explore_failures = part_three_exploration(run)
        failures += explore_failures
    return result, failures


def part_three_exploration(run: Run) -> tuple[dict, list[str]]:
    """Every variant against the base model, on both tasks, mean and spread over --seeds seeds."""
    args = run.args
    variants = args.variants.split(",") if args.variants else list(experiments.VARIANTS)
    print("\n== exploration")
    results, failures = experiments.explore(args, variants, args.seeds, experiments.worker_count(args.workers))
    tables = experiments.exploration_tables(results)
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
        utilities.write_text(run.out / f"explore_{name}.md", table + "\n")
    if not args.no_plots:
        experiments.plot_exploration(results, run.out)
    print(f"\nexploration took {results['seconds']:.0f} s")
    return results, failures


def print_part_three_table(result: dict):
    rows = [[name, report["num_parameters"], report["evals"][-1]["train_perplexity"],
             *report["evals"][-1]["perplexity"].values()] for name, report in result["lm"].items()]
    print("\n" + utilities.markdown_table(["decoder", "parameters", "train ppl", "obama", "wbush", "hbush"], rows))
    rows = [[name, report["num_parameters"], report["test_accuracy"], report["test_accuracy_unseen"]]
            for name, report in result["classifier"].items()]
    print("\n" + utilities.markdown_table(["classifier", "parameters", "test acc %", "unseen acc %"], rows))


PARTS = {"one": part_one, "two": part_two, "three": part_three}


# ---------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    base, training = TransformerConfig(), TrainingConfig()
    parser = Parser(prog="main.py", description=__doc__)
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for JSON, plots and heatmaps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument("--extra-test", action="append", default=[], metavar="PATH",
                        help="another labelled TSV (part one) or text file (parts two, three) to evaluate on")
    parser.add_argument("--no-plots", action="store_true", help="skip PNG figures and heatmaps")
    explore = parser.add_argument_group("part three exploration")
    explore.add_argument("--explore", action="store_true", help="also compare every architecture variant")
    explore.add_argument("--variants", help=f"comma-separated subset of: {', '.join(experiments.VARIANTS)}")
    explore.add_argument("--seeds", type=int, default=3, help="seeds per variant (from --seed on)")
    explore.add_argument("--workers", type=int, help="worker processes (default: one per core, at most 2)")
    parser.add_argument("--tokenizer", choices=("word", "bpe"), default="word",
                        help="word: NLTK words (the course's); bpe: byte-level BPE trained on the training text")
    parser.add_argument("--bpe-vocab", type=int, default=2000, help="BPE vocabulary size (specials and bytes included)")
    sizes = parser.add_argument_group("model")
    for name in ("block_size", "n_embd", "n_head", "n_layer", "ff_hidden"):
        sizes.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(base, name))
    optimisation = parser.add_argument_group("training")
    optimisation.add_argument("--batch-size", type=int, default=training.batch_size)
    optimisation.add_argument("--learning-rate", type=float, default=training.learning_rate)
    optimisation.add_argument("--epochs", type=int, default=training.epochs, help="classifier epochs")
    optimisation.add_argument("--max-iters", type=int, default=training.max_iters, help="language-model iterations")
    optimisation.add_argument("--eval-interval", type=int, default=training.eval_interval)
    return parser


def resolve_device(name: str) -> torch.device:
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = make_run(args)
        data = run.data
        started = time.perf_counter()
        result, failures = PARTS[args.part](run)
        result["seconds"] = time.perf_counter() - started
        result["seed"] = args.seed
        result["skipped_empty_segments"] = data.train_cls.skipped_empty + data.test_cls.skipped_empty
        path = utilities.write_json(run.out / f"part_{args.part}.json", result)
    except (DataError, ValueError, OSError) as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    print(f"\nwrote {path} ({result['seconds']:.1f} s)")
    if failures:
        print("attention sanity checks FAILED:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("attention sanity checks passed: rows sum to 1, masks hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
