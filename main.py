"""The course suite: python main.py --part one|two|three [options], or main.py generate|convert|gap|sweep [options]."""

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import commands
import corpus
import experiments
import gap
import heads
import parallel as data_parallel
import scaling
import seq2seq
import sweep
import training
import utilities
from baselines import audit, format_audit
from checkpointing import TrainingInterrupted
from commands import Parser
from dataset import DataError, read_labelled_segments, read_text
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


def read_extra_tests(run: Run) -> dict:
    """Every --extra-test file, read and checked before any training (a typo must not cost a run): labelled
    segments for part one, for parts two and three a text with at least one token to score after the first."""
    if run.args.part == "one":
        return {Path(path).name: read_labelled_segments(path, num_classes=len(run.data.class_names))
                for path in run.args.extra_test}
    return {Path(path).name: training.check_scorable(run, read_text(path), path) for path in run.args.extra_test}


def extra_accuracy(run: Run, model) -> dict:
    """Accuracy on each --extra-test TSV."""
    results = {}
    for name, segments in run.extra_tests.items():
        ids, labels = classifier_tensors(run, segments, model.config.block_size)
        results[name] = accuracy(predict(model, ids, run.device), labels)
    return results


def extra_perplexity(run: Run, model) -> dict:
    """Perplexity on each --extra-test text file."""
    return {name: perplexity(model, encode_stream(run, text), model.config.block_size, run.device)
            for name, text in run.extra_tests.items()}


def save_model(run: Run, model, task: str, metrics: dict):
    """With --save DIR: weights, config, tokenizer and test metrics, written atomically."""
    if run.args.save:
        config = {**model.config.to_dict(), "model": task}
        path = utilities.save_checkpoint(run.args.save, model, config, run.tokenizer.to_json(), metrics)
        print(f"saved checkpoint to {path}")


def harness(run: Run, part: str) -> training.Harness:
    """Checkpoints, progress, logs and data parallel processes for a part's training, from the flags."""
    args = run.args
    # a refit preset's second training checkpoints into a refit/ folder inside the first's (Harness.for_refit)
    return training.Harness(name=f"part_{part}", checkpoint_dir=args.out / f"checkpoint_part_{part}",
                            checkpoint_every=args.checkpoint_every, resume=args.resume, log_dir=args.log_dir,
                            progress_bar=not args.quiet and sys.stderr.isatty(), parallel=run.parallel)


def part_one(run: Run) -> tuple[dict, list[str]]:
    """Encoder + classifier: per-epoch table, final, seen and unseen test accuracy."""
    course = training_config(run, "classifier")
    model, report = train_classifier(run, model_config(run, "classifier"), course, run.args.seed,
                                     harness=harness(run, "one"))
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
    course = training_config(run, "lm")
    model, report = train_language_model(run, model_config(run, "lm"), course, run.args.seed, harness=harness(run, "two"))
    failures = check_attention(run, model, True, "part2_decoder")
    result = {"vocab_size": run.tokenizer.vocab_size, "tokenizer": run.args.tokenizer, **report,
              "extra": extra_perplexity(run, model)}
    print(f"parameters: {report['num_parameters']:,}   vocabulary: {run.tokenizer.vocab_size:,} ({run.args.tokenizer})")
    if "best_iteration" in report:
        how = "retrained on all of train_LM.txt up to it" if report.get("refit") else "restored that model"
        print(f"validation chose iteration {report['best_iteration']}, {how}: test perplexity "
              + ", ".join(f"{k} {v:.2f}" for k, v in report["final"]["perplexity"].items()))
    if "word_perplexity" in report["final"]:
        print("word-level perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in report["final"]["word_perplexity"].items()))
    print(f"final figures are those of {report['final']['model']}")
    for name, value in result["extra"].items():
        print(f"perplexity on {name}: {value:.2f}")
    if not run.args.no_plots:
        plot_perplexities(run, {"decoder": report}, run.out / "part_two_perplexity.png", "Part two: decoder perplexity")
    save_model(run, model, "lm", {"perplexity": report["final"]["perplexity"]})
    return result, failures


def part_three(run: Run) -> tuple[dict, list[str]]:
    """ALiBi against learned absolute positions, for the decoder and the classifier, same seed and batches."""
    seed = run.args.seed
    result, failures, head_statistics = {"lm": {}, "classifier": {}}, [], {}
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== decoder, {name} positions")
        model, report = train_language_model(run, model_config(run, "lm", position=position), training_config(run, "lm"), seed)
        failures += check_attention(run, model, True, f"part3_decoder_{name}")
        result["lm"][name] = {"vocab_size": run.tokenizer.vocab_size, **report, "extra": extra_perplexity(run, model)}
        if run.args.heads:
            head_statistics[f"decoder {name}"] = heads.decoder_heads(run, model)
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== classifier, {name} positions")
        config = model_config(run, "classifier", position=position)
        model, report = train_classifier(run, config, training_config(run, "classifier"), seed)
        failures += check_attention(run, model, False, f"part3_encoder_{name}")
        result["classifier"][name] = {key: report[key] for key in
                                      ("num_parameters", "test_accuracy", "test_accuracy_seen", "test_accuracy_unseen")}
        result["classifier"][name]["extra"] = extra_accuracy(run, model)
        if run.args.heads:
            head_statistics[f"encoder {name}"] = heads.encoder_heads(run, model)
    print_part_three_table(result)
    if run.args.heads:
        result["heads"] = part_three_heads(run, head_statistics)
    if not run.args.no_plots:
        plot_perplexities(run, result["lm"], run.out / "part_three_perplexity.png", "Part three: absolute vs ALiBi")
    if run.args.t5:
        result["t5"] = part_three_t5(run)
    if run.args.explore:
        result["exploration"], explore_failures = part_three_exploration(run)
        failures += explore_failures
    if run.args.improve:
        result["improve"], improve_failures = part_three_improvement(run)
        failures += improve_failures
    if run.args.scaling:
        result["scaling"] = part_three_scaling(run)
    if run.args.gap:
        print("\n== gap by word frequency (docs/gap.md)")
        result["gap"] = gap.study(run, run.args.seed)
        gap.report(result["gap"], run.out, not run.args.no_plots)
    return result, failures


def part_three_scaling(run: Run) -> dict:
    """Transformers against the count models on growing slices of sotu-all (scaling.py)."""
    print("\n== data scaling (sotu-all)")
    results = scaling.study(run.args, experiments.worker_count(run.args.workers))
    report_study(run, "scaling", scaling.tables(results), scaling.plot, results)
    return results


def report_study(run: Run, study: str, tables: dict[str, str], plot, results: dict):
    """Print a study's tables and write them as OUT/<study>_<table>.md, draw its plots, say how long it took."""
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
        utilities.write_text(run.out / f"{study}_{name}.md", table + "\n")
    if not run.args.no_plots:
        plot(results, run.out)
    print(f"\n{study} took {results['seconds']:.0f} s")


def part_three_heads(run: Run, statistics: dict) -> dict:
    """What each head attends to, learned positions against ALiBi: tables (printed and saved) and a heatmap grid."""
    summary = heads.summary_table(statistics)
    print(f"\n== heads (test set)\n{summary}")
    tables = [f"## {name}\n\n{heads.heads_table(values)}" for name, values in statistics.items()]
    utilities.write_text(run.out / "heads.md", "\n\n".join([f"## mean over heads\n\n{summary}", *tables]) + "\n")
    if not run.args.no_plots:
        heads.plot_heads(statistics, run.out / "heads.png")
    return statistics


def part_three_t5(run: Run) -> dict:
    """The T5-style encoder-decoder trained on span corruption: target perplexity, greedy and beam decoding."""
    print("\n== T5-style encoder-decoder, span corruption of train_LM.txt")
    _, report = seq2seq.train_span_corruption(run, run.args.seed)
    print(f"parameters: {report['num_parameters']:,}   target perplexity: "
          + ", ".join(f"{k} {v:.2f}" for k, v in report["target_perplexity"].items())
          + "   decoding accuracy (obama, first 100 windows): "
          + ", ".join(f"{k} {v:.1f}%" for k, v in report["decoding_accuracy"].items()))
    return report


def part_three_improvement(run: Run) -> tuple[dict, list[str]]:
    """Baselines, the course base model and the best preset side by side, mean over --seeds seeds."""
    print("\n== improvement")
    results, failures = experiments.improve(run.args, run, run.args.seeds, experiments.worker_count(run.args.workers))
    report_study(run, "improve", experiments.improve_tables(results), experiments.plot_improve, results)
    return results, failures


def part_three_exploration(run: Run) -> tuple[dict, list[str]]:
    """Every variant against the base model, on both tasks, mean and spread over --seeds seeds."""
    args = run.args
    variants = experiments.variant_names(args.variants)
    print("\n== exploration")
    results, failures = experiments.explore(args, variants, args.seeds, experiments.worker_count(args.workers))
    report_study(run, "explore", experiments.exploration_tables(results), experiments.plot_exploration, results)
    return results, failures


def print_part_three_table(result: dict):
    """Each row's figures come from one model, the one returned (its "model" says which)."""
    rows = [[name, report["num_parameters"], report["final"]["train_perplexity"], *report["final"]["perplexity"].values(),
             report["final"]["model"]] for name, report in result["lm"].items()]
    print("\n" + utilities.markdown_table(["decoder", "parameters", "train ppl", "obama", "wbush", "hbush", "model"], rows))
    rows = [[name, report["num_parameters"], report["test_accuracy"], report["test_accuracy_unseen"]]
            for name, report in result["classifier"].items()]
    print("\n" + utilities.markdown_table(["classifier", "parameters", "test acc %", "unseen acc %"], rows))


PARTS = {"one": part_one, "two": part_two, "three": part_three}


def quiet_unless_main(run: Run):
    """Data parallel processes other than 0 print nothing and write no plots, heatmaps or saved models."""
    if run.parallel.is_main:
        return contextlib.nullcontext()
    run.args.no_plots, run.args.save = True, None
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # the process exits right after


def resume_command(argv: list[str], directory: Path, parallel) -> str:
    """The command line that continues a stopped run: the same options, and --resume DIR."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        skip = arg == "--resume"
        if not skip:
            kept.append(arg)
    launcher = f"torchrun --nproc-per-node {parallel.world_size} main.py" if parallel.active else "python main.py"
    return f"{launcher} {shlex.join([*kept, '--resume', str(directory)])}"


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The parser of `main.py --part ...` (the sweep subcommand and the benches reuse it for a run's defaults)."""
    base, course = TransformerConfig(), TrainingConfig()
    parser = Parser(prog="main.py", description=__doc__)
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--data-dir", type=Path, help="folder of the six data files (default: speechesdataset/ if it holds "
                        "them, else the public-domain stand-in)")
    parser.add_argument("--corpus", choices=("auto", "course", *corpus.CORPORA), default="auto",
                        help="without --data-dir: sotu-standin (three presidents) or sotu-all (every address, 1790-present), "
                        "built from the sotu package into --cache-dir")
    parser.add_argument("--cache-dir", type=Path, default=corpus.DEFAULT_CACHE, help="where built corpora are kept")
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
    explore.add_argument("--scaling", action="store_true",
                         help="also train the transformers and count models on growing slices of sotu-all (scaling.py)")
    explore.add_argument("--scaling-full", action="store_true",
                         help="with --scaling: add the 512k, 1M and whole-corpus slices (and 8k, 16k, all segments)")
    explore.add_argument("--scaling-lm-steps", type=int, default=1500, help="with --scaling: decoder iterations per slice")
    explore.add_argument("--scaling-cls-steps", type=int, default=1500,
                         help="with --scaling: encoder steps per slice (at least 2 epochs, at most the preset's)")
    explore.add_argument("--heads", action="store_true",
                         help="also measure what each head attends to, learned positions vs ALiBi (heads.py)")
    explore.add_argument("--t5", action="store_true",
                         help="also train a T5-style encoder-decoder on span corruption (encoder_decoder.py, seq2seq.py)")
    explore.add_argument("--gap", action="store_true",
                         help="also the gap to Kneser-Ney by word frequency, with the headline decoder rows (docs/gap.md)")
    explore.add_argument("--seeds", type=int, default=3, help="seeds per variant (from --seed on)")
    explore.add_argument("--workers", type=int,
                         help="worker processes (default: one per core, at most 2; 1: train in this process)")
    speed = parser.add_argument_group("speed (docs/training.md)")
    speed.add_argument("--precision", choices=training.PRECISIONS, default="fp32",
                       help="autocast dtype of the training forward pass: fp32 (the course's numbers), bf16 (CPU or CUDA), "
                            "fp16 (CUDA only, with a gradient scaler); evaluation stays fp32")
    speed.add_argument("--compile", action="store_true", help="torch.compile the training steps (pays for long runs only)")
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
    long_runs = parser.add_argument_group("long runs (parts one and two; docs/long-runs.md)")
    long_runs.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                         help="write a resumable checkpoint to OUT/checkpoint_part_PART every STEPS steps "
                              "(one is also written on Ctrl-C or SIGTERM)")
    long_runs.add_argument("--resume", type=Path, metavar="DIR", help="continue the run whose checkpoint is in DIR")
    long_runs.add_argument("--log-dir", type=Path, metavar="DIR",
                         help="write a JSON-lines log of steps and evaluations (and TensorBoard events if installed)")
    long_runs.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def seed_list(text: str) -> list[int]:
    """--seeds 42,43,44 -> [42, 43, 44]."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def build_sweep_parser() -> argparse.ArgumentParser:
    """The parser of `main.py sweep`."""
    parser = Parser(prog="main.py sweep", description=sweep.__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sweep.TASKS, required=True)
    parser.add_argument("--data-dir", type=Path, help="as for main.py --part (default: speechesdataset/ or the stand-in)")
    parser.add_argument("--seeds", type=seed_list, default=[42], help="comma-separated seeds (default 42)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    parser.add_argument("--candidates", default=",".join(sweep.CANDIDATES),
                        help=f"comma-separated subset of: {', '.join(sweep.CANDIDATES)}")
    return parser


def sweep_command(argv) -> int:
    """python main.py sweep --task classifier|lm [...]: validation figures of the best preset's candidates."""
    parser = build_sweep_parser()
    args = parser.parse_args(argv)
    names = args.candidates.split(",")
    unknown = [name for name in names if name not in sweep.CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate {unknown[0]!r}")
    torch.set_num_threads(1)  # as the --improve workers train
    try:
        data = ["--data-dir", str(args.data_dir)] if args.data_dir else []
        run = training.make_run(build_parser().parse_args(["--part", "two", "--device", args.device, *data]))
    except (DataError, ValueError, OSError) as error:
        print(f"main.py sweep: error: {error}", file=sys.stderr)
        return 2
    sweep.print_best_validations(run, args.task, names, args.seeds)
    return 0


COMMANDS = {"generate": commands.generate_command, "convert": commands.convert_command, "gap": commands.gap_command,
            "sweep": sweep_command}


PART_THREE_OPTIONS = ("explore", "variants", "improve", "scaling", "scaling_full", "scaling_lm_steps", "scaling_cls_steps",
                      "heads", "t5", "gap", "seeds", "workers")


def main(argv=None) -> int:
    """Run a subcommand or a part; exit status 0, 1 (an attention check failed), 2 (bad input), 128 + signal."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be 0 (off) or positive, got {args.checkpoint_every}")
        for flag, value in (("--seeds", args.seeds), ("--workers", args.workers),
                            ("--scaling-lm-steps", args.scaling_lm_steps), ("--scaling-cls-steps", args.scaling_cls_steps)):
            if value is not None and value < 1:  # checked now, not after part three's first trainings
                raise ValueError(f"{flag} must be positive, got {value}")
        # the options of part three's studies, given to part one or two, would be silently ignored
        studies = [name for name in PART_THREE_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if args.part != "three" and studies:
            raise ValueError(f"--{studies[0].replace('_', '-')} applies to part three only: use it with --part three")
        if args.part == "three" and (args.checkpoint_every or args.resume or data_parallel.launched_by_torchrun()):
            raise ValueError("checkpoints, --resume and torchrun apply to parts one and two")
        run = training.make_run(args)
        run.extra_tests = read_extra_tests(run)
        if args.explore:
            experiments.variant_names(args.variants)  # a typo must not cost the runs before the exploration
        if data_parallel.launched_by_torchrun():
            run.parallel, run.device = data_parallel.start(run.device)
        with quiet_unless_main(run):
            data = run.data
            started = time.perf_counter()
            if args.audit:
                print(format_audit(audit(run.data)) + "\n")
            result, failures = PARTS[args.part](run)
            result["seconds"] = time.perf_counter() - started
            result["data"] = data.source
            result["seed"] = args.seed
            result["skipped_empty_segments"] = data.train_cls.skipped_empty + data.test_cls.skipped_empty
            if not run.parallel.is_main:
                return 0
            path = utilities.write_json(run.out / f"part_{args.part}.json", result)
    except (DataError, ValueError, OSError) as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        if run.parallel.is_main:
            print(f"main.py: {stopped}; checkpoint written to {stopped.directory}\n"
                  f"resume with: {resume_command(argv, stopped.directory, run.parallel)}", file=sys.stderr)
        return stopped.exit_status
    finally:
        data_parallel.stop()
    print(f"\nwrote {path} ({result['seconds']:.1f} s)")
    if failures:
        print("attention sanity checks FAILED:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("attention sanity checks passed: rows sum to 1, masks hold")
    return 0


if __name__ == "__main__":
    training.keep_freed_memory()
    sys.exit(main())
