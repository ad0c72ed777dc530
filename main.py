"""The course suite: python main.py --part one|two|three [options]."""

import argparse
import sys
import time
from pathlib import Path

import torch

import experiments
import gap
import training
import utilities
from baselines import audit, format_audit
from dataset import DataError, load_speeches, read_labelled_segments, read_text
from generation import STRATEGIES, generate
from tokenizer import PAD_ID, SPECIALS, UNK_ID, WordTokenizer, tokenizer_from_json
from training import (
    PRESETS,
    Run,
    TrainingConfig,
    accuracy,
    classifier_tensors,
    encode_stream,
    model_config,
    perplexity,
    predict,
    train_classifier,
    train_language_model,
    training_config,
)
from transformer import TransformerConfig

# ---------------------------------------------------------------- the parts


def check_attention(run: Run, model, causal: bool, prefix: str) -> list[str]:
    """The attention sanity checks (and heatmaps) on the first test segment or the Obama test text."""
    text = run.data.test_lm["obama"] if causal else run.data.test_cls.texts[0]
    return utilities.attention_check(model, run.tokenizer, text, causal, run.device, run.heatmap_dir, prefix)


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


def save_model(run: Run, model, task: str, metrics: dict):
    """With --save DIR: weights, config, tokenizer and test metrics, written atomically."""
    if run.args.save:
        config = {**model.config.to_dict(), "model": task}
        path = utilities.save_checkpoint(run.args.save, model, config, run.tokenizer.to_json(), metrics)
        print(f"saved checkpoint to {path}")


def part_one(run: Run) -> tuple[dict, list[str]]:
    """Encoder + classifier: per-epoch table, final, seen and unseen test accuracy."""
    model, report = train_classifier(run, model_config(run, "classifier"), training_config(run, "classifier"), run.args.seed)
    failures = check_attention(run, model, False, "part1_encoder")
    result = {"vocab_size": run.tokenizer.vocab_size, "tokenizer": run.args.tokenizer, **report,
              "extra": extra_accuracy(run, model)}
    print(f"parameters: {report['num_parameters']:,}   vocabulary: {run.tokenizer.vocab_size:,}")
    print(f"test accuracy: {report['test_accuracy']:.2f}%   on segments seen in train_CLS.tsv "
          f"({report['num_test_seen']}): {report['test_accuracy_seen']:.2f}%   unseen ({report['num_test_unseen']}): "
          f"{report['test_accuracy_unseen']:.2f}%   in neither training file ({report['num_test_unseen_both']}): "
          f"{report['test_accuracy_unseen_both']:.2f}%")
    for name, value in result["extra"].items():
        print(f"accuracy on {name}: {value:.2f}%")
    if not run.args.no_plots:
        epochs = [row["epoch"] for row in report["epochs"]]
        utilities.plot_curves({name: (epochs, [row[key] for row in report["epochs"]])
                               for name, key in (("train", "train_accuracy"), ("test", "test_accuracy"))},
                              "epoch", "accuracy (%)", "Part one: classifier accuracy", run.out / "part_one_accuracy.png")
    save_model(run, model, "classifier", {key: value for key, value in report.items() if key.startswith("test_accuracy")})
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
    model, report = train_language_model(run, model_config(run, "lm"), training_config(run, "lm"), run.args.seed)
    failures = check_attention(run, model, True, "part2_decoder")
    result = {"vocab_size": run.tokenizer.vocab_size, "tokenizer": run.args.tokenizer, **report,
              "extra": extra_perplexity(run, model)}
    print(f"parameters: {report['num_parameters']:,}   vocabulary: {run.tokenizer.vocab_size:,} ({run.args.tokenizer})")
    if "best_iteration" in report:
        how = "retrained on all of train_LM.txt up to it" if report.get("refit") else "restored that model"
        print(f"validation chose iteration {report['best_iteration']}, {how}: test perplexity "
              + ", ".join(f"{k} {v:.2f}" for k, v in report["final"]["perplexity"].items()))
    if "word_perplexity" in report["evals"][-1]:
        print("word-level perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in report["evals"][-1]["word_perplexity"].items()))
    for name, value in result["extra"].items():
        print(f"perplexity on {name}: {value:.2f}")
    if not run.args.no_plots:
        plot_perplexities(run, {"decoder": report}, run.out / "part_two_perplexity.png", "Part two: decoder perplexity")
    save_model(run, model, "lm", {"perplexity": report["final"]["perplexity"]})
    return result, failures


def part_three(run: Run) -> tuple[dict, list[str]]:
    """ALiBi against learned absolute positions, for the decoder and the classifier, same seed and batches."""
    seed = run.args.seed
    result, failures = {"lm": {}, "classifier": {}}, []
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== decoder, {name} positions")
        model, report = train_language_model(run, model_config(run, "lm", position=position), training_config(run, "lm"), seed)
        failures += check_attention(run, model, True, f"part3_decoder_{name}")
        result["lm"][name] = {"vocab_size": run.tokenizer.vocab_size, **report, "extra": extra_perplexity(run, model)}
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== classifier, {name} positions")
        config = model_config(run, "classifier", position=position)
        model, report = train_classifier(run, config, training_config(run, "classifier"), seed)
        failures += check_attention(run, model, False, f"part3_encoder_{name}")
        result["classifier"][name] = {key: report[key] for key in
                                      ("num_parameters", "test_accuracy", "test_accuracy_seen", "test_accuracy_unseen")}
        result["classifier"][name]["extra"] = extra_accuracy(run, model)
    print_part_three_table(result)
    if not run.args.no_plots:
        plot_perplexities(run, result["lm"], run.out / "part_three_perplexity.png", "Part three: absolute vs ALiBi")
    if run.args.explore:
        result["exploration"], explore_failures = part_three_exploration(run)
        failures += explore_failures
    if run.args.improve:
        result["improve"], improve_failures = part_three_improvement(run)
        failures += improve_failures
    if run.args.gap:
        print("\n== gap by word frequency (docs/gap.md)")
        result["gap"] = gap.study(run, run.args.seed)
        gap.report(result["gap"], run.out, not run.args.no_plots)
    return result, failures


def part_three_improvement(run: Run) -> tuple[dict, list[str]]:
    """Baselines, the course base model and the best preset side by side, mean over --seeds seeds."""
    print("\n== improvement")
    results, failures = experiments.improve(run.args, run, run.args.seeds, experiments.worker_count(run.args.workers))
    for name, table in experiments.improve_tables(results).items():
        print(f"\n{name}\n{table}")
        utilities.write_text(run.out / f"improve_{name}.md", table + "\n")
    if not run.args.no_plots:
        experiments.plot_improve(results, run.out)
    print(f"\nimprovement took {results['seconds']:.0f} s")
    return results, failures


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
    base, course = TransformerConfig(), TrainingConfig()
    parser = Parser(prog="main.py", description=__doc__)
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for JSON, plots and heatmaps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument("--extra-test", action="append", default=[], metavar="PATH",
                        help="another labelled TSV (part one) or text file (parts two, three) to evaluate on")
    parser.add_argument("--no-plots", action="store_true", help="skip PNG figures and heatmaps")
    parser.add_argument("--save", type=Path, metavar="DIR", help="parts one and two: save the trained model here")
    parser.add_argument("--audit", action="store_true", help="print the exact-text overlaps between all data splits")
    explore = parser.add_argument_group("part three exploration")
    explore.add_argument("--explore", action="store_true", help="also compare every architecture variant")
    explore.add_argument("--variants", help=f"comma-separated subset of: {', '.join(experiments.VARIANTS)} (base always runs)")
    explore.add_argument("--improve", action="store_true",
                         help="also compare baselines, the course model and the best preset (training.PRESETS)")
    explore.add_argument("--gap", action="store_true",
                         help="also the gap to Kneser-Ney by word frequency, with the novel-word rows (docs/gap.md)")
    explore.add_argument("--seeds", type=int, default=3, help="seeds per variant (from --seed on)")
    explore.add_argument("--workers", type=int, help="worker processes (default: one per core, at most 2)")
    parser.add_argument("--tokenizer", choices=("word", "bpe"), default="word",
                        help="word: NLTK words (the course's); bpe: byte-level BPE trained on the training text")
    parser.add_argument("--bpe-vocab", type=int, default=2000, help="BPE vocabulary size (specials and bytes included)")
    parser.add_argument("--preset", choices=PRESETS, default="base",
                        help="named settings (training.PRESETS): base is the course's; flags below override it")
    sizes = parser.add_argument_group("model (default: the preset's; base = the course's)")
    for name in training.MODEL_FLAGS:
        sizes.add_argument("--" + name.replace("_", "-"), type=int, help=f"base: {getattr(base, name)}")
    optimisation = parser.add_argument_group("training (default: the preset's; base = the course's)")
    for name in training.TRAINING_FLAGS:
        kind = float if name == "learning_rate" else int
        optimisation.add_argument("--" + name.replace("_", "-"), type=kind, help=f"base: {getattr(course, name)}")
    return parser


def build_generate_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="main.py generate", description="Continue a prompt with a saved decoder (--part two --save DIR).")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    parser.add_argument("--temperature", type=float, default=1.0, help="> 0; greedy ignores it")
    parser.add_argument("--top-k", type=int, help="top-k (and optionally sample): keep the k likeliest tokens")
    parser.add_argument("--top-p", type=float, help="top-p (and optionally sample): smallest set with mass >= p")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-context", type=int, help="tokens the model sees (default block_size)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def generate_command(argv) -> int:
    """python main.py generate --checkpoint DIR --prompt "..." [options]: print the continuation."""
    args = build_generate_parser().parse_args(argv)
    try:
        model, tokenizer_json, _ = utilities.build_and_load(args.checkpoint)
        if not hasattr(model, "lm_head"):
            raise ValueError(f"{args.checkpoint}: holds a classifier; generation needs a decoder (--part two --save)")
        tokenizer = tokenizer_from_json(tokenizer_json)
        prompt = tokenizer.encode(args.prompt)
        word_level = isinstance(tokenizer, WordTokenizer)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if word_level and all(i == UNK_ID for i in prompt):
            raise ValueError(f"every word of the prompt is outside the vocabulary: {args.prompt!r}")
        # never emit padding or specials; the word tokenizer's <unk> is not a word either
        suppressed = (PAD_ID, UNK_ID) if word_level else tuple(range(len(SPECIALS)))
        new = generate(model, prompt, args.max_new_tokens, args.strategy, args.temperature, args.top_k, args.top_p,
                       args.beams, torch.Generator().manual_seed(args.seed), max_context=args.max_context,
                       suppress_ids=suppressed)
    except ValueError as error:  # CheckpointError included
        print(f"main.py generate: error: {error}", file=sys.stderr)
        return 2
    print(tokenizer.decode(prompt) + (" " if word_level else "") + tokenizer.decode(new))
    return 0


def build_gap_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="main.py gap", description="The gap to Kneser-Ney by word frequency of a saved decoder.")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="from --part two --save DIR")
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the tables, JSON and plot")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def gap_command(argv) -> int:
    """python main.py gap --checkpoint DIR [--data-dir DIR] [--out DIR]: print and write the gap tables."""
    args = build_gap_parser().parse_args(argv)
    try:
        model, tokenizer_json, _ = utilities.build_and_load(args.checkpoint)
        if not hasattr(model, "lm_head"):
            raise ValueError(f"{args.checkpoint}: holds a classifier; the gap needs a decoder (--part two --save)")
        data = load_speeches(args.data_dir)
        words = WordTokenizer.from_texts(data.vocabulary_texts())
        if tokenizer_from_json(tokenizer_json).to_json() != words.to_json():
            raise ValueError(f"{args.checkpoint}: its tokenizer is not the word vocabulary of {args.data_dir}")
        result = gap.checkpoint_gap(model, words, data, torch.device("cpu"))
        gap.report(result, args.out, not args.no_plots)
        path = utilities.write_json(args.out / "gap.json", result)
    except (DataError, ValueError, OSError) as error:  # CheckpointError included
        print(f"main.py gap: error: {error}", file=sys.stderr)
        return 2
    print(f"\nwrote {path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["generate"]:
        return generate_command(argv[1:])
    if argv[:1] == ["gap"]:
        return gap_command(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        run = training.make_run(args)
        data = run.data
        started = time.perf_counter()
        if args.audit:
            print(format_audit(audit(run.data)) + "\n")
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
