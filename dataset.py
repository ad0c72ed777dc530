"""Reading the speeches data, checking it, and turning it into batches of token ids."""

import hashlib
import json
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from tokenizer import PAD_ID, UNK_ID

CLASS_NAMES = ("Barack Obama", "George W. Bush", "George H. W. Bush")
TRAIN_CLS, TEST_CLS, TRAIN_LM = "train_CLS.tsv", "test_CLS.tsv", "train_LM.txt"
TEST_LM = {"obama": "test_LM_obama.txt", "wbush": "test_LM_wbush.txt", "hbush": "test_LM_hbush.txt"}
DATA_FILES = (TRAIN_CLS, TEST_CLS, TRAIN_LM, *TEST_LM.values())
MANIFEST = "corpus.json"  # written by corpus.py beside the six files it builds; the course's folder has none


class DataError(ValueError):
    """Bad input data: the message is one line that names the file (and line)."""


def read_text(path: Path, hint: str = "") -> str:
    """The whole file as text; missing, empty or non-UTF-8 files raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


@dataclass
class LabelledSegments:
    texts: list[str]
    labels: list[int]
    skipped_empty: int = 0


def read_labelled_segments(path: Path, hint: str = "", num_classes: int = len(CLASS_NAMES)) -> LabelledSegments:
    """Parse `label<TAB>segment` lines (labels 0 .. num_classes - 1); empty segments are skipped and counted."""
    segments, labels = LabelledSegments([], []), [str(label) for label in range(num_classes)]
    for number, line in enumerate(read_text(path, hint).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{path}:{number}: expected 'label<TAB>segment', found {len(fields) - 1} tabs")
        label, text = fields[0].strip(), fields[1].strip()
        if label not in labels:
            raise DataError(f"{path}:{number}: label {label!r} is not {', '.join(labels[:-1])} or {labels[-1]}")
        if not text:
            segments.skipped_empty += 1
            continue
        segments.texts.append(text)
        segments.labels.append(int(label))
    if not segments.texts:
        raise DataError(f"{path}: no labelled segments")
    return segments


@dataclass
class Speeches:
    """The six course files, read and checked."""

    train_cls: LabelledSegments
    test_cls: LabelledSegments
    train_lm: str
    test_lm: dict[str, str]
    class_names: tuple[str, ...] = CLASS_NAMES
    source: str = "course"  # or the corpus.py corpus the files were built as
    vocabulary_cap: int | None = None  # the word vocabulary keeps the most frequent words (None: every word)
    manifest: dict = field(default_factory=dict)

    def vocabulary_texts(self) -> list[str]:
        """The non-test text the vocabulary is built from (as the course does)."""
        return self.train_cls.texts + [self.train_lm]


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(data_dir: Path) -> dict | None:
    """A built corpus's manifest (None for the course's folder); DataError if any file differs from its digest."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        changed = [file for file in DATA_FILES if not (path.parent / file).is_file() or digest(path.parent / file) != files[file]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: unreadable manifest ({type(error).__name__}); delete the folder to rebuild it") from None
    if changed:
        raise DataError(f"{path.parent / changed[0]}: differs from {MANIFEST} (half-written or edited); "
                        "delete the folder to rebuild it")
    return manifest


def load_speeches(data_dir: Path) -> Speeches:
    """Read the six files from `data_dir` (the course's, or a corpus.py build), raising DataError on any problem."""
    data_dir = Path(data_dir)
    hint = f" (looked in --data-dir {data_dir})"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found; pass --data-dir DIR holding the six course files")
    manifest = read_manifest(data_dir) or {}
    class_names = tuple(manifest.get("class_names", CLASS_NAMES))
    return Speeches(
        train_cls=read_labelled_segments(data_dir / TRAIN_CLS, hint, len(class_names)),
        test_cls=read_labelled_segments(data_dir / TEST_CLS, hint, len(class_names)),
        train_lm=read_text(data_dir / TRAIN_LM, hint),
        test_lm={name: read_text(data_dir / file, hint) for name, file in TEST_LM.items()},
        class_names=class_names, source=manifest.get("corpus", "course"),
        vocabulary_cap=manifest.get("vocabulary_cap"), manifest=manifest,
    )


def overlap_flags(speeches: Speeches) -> dict[str, list[bool]]:
    """Per test_CLS segment: is its exact text a train_CLS segment, a substring of train_LM.txt, in neither?"""
    train_cls = set(speeches.train_cls.texts)
    in_cls = [text in train_cls for text in speeches.test_cls.texts]
    # substring rather than whole line: train_LM lines hold one or more sentences, so a segment may sit inside one
    in_lm = [text in speeches.train_lm for text in speeches.test_cls.texts]
    return {"in_train_cls": in_cls, "in_train_lm": in_lm, "in_neither": [not (a or b) for a, b in zip(in_cls, in_lm)]}


def lines_of(text: str) -> list[str]:
    """Non-blank lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def speaker_blocks(speeches: Speeches, indices=None) -> list[tuple[str, int]]:
    """train_LM.txt's lines labelled by the speaker block they sit in: a line whose text is a train_CLS segment
    among `indices` (default: all) takes its label, and so does every line between two such lines of one label. A
    line that is a train_CLS segment outside `indices` is left out (a validation segment stays unseen), as are the
    lines before the first labelled line, after the last, and between two labels. Returns (line, label) in file order."""
    segments = speeches.train_cls
    chosen = range(len(segments.texts)) if indices is None else indices
    label_of = {segments.texts[index]: segments.labels[index] for index in chosen}
    held_out = set(segments.texts) - set(label_of)
    lines = lines_of(speeches.train_lm)
    known = [(number, label_of[line]) for number, line in enumerate(lines) if line in label_of]
    labelled = dict(known)
    for (start, label), (end, next_label) in pairwise(known):
        if label == next_label:
            labelled.update({number: label for number in range(start + 1, end)})
    return [(lines[number], label) for number, label in sorted(labelled.items()) if lines[number] not in held_out]


def audit(speeches: Speeches) -> dict:
    """Counts of exact-text overlaps between every pair of splits (segments, lines, substrings of train_LM.txt)."""
    train_cls, train_lm = set(speeches.train_cls.texts), speeches.train_lm
    train_lm_lines = set(lines_of(train_lm))
    labelled = set(zip(speeches.train_cls.texts, speeches.train_cls.labels))
    test, blocks = speeches.test_cls, {line for line, _ in speaker_blocks(speeches)}
    test_cls = {"segments": len(test.texts), **{k: sum(v) for k, v in overlap_flags(speeches).items()},
                "in_train_lm_as_line": sum(text in train_lm_lines for text in test.texts),
                "in_train_cls_same_label": sum(pair in labelled for pair in zip(test.texts, test.labels)),
                "unseen_in_speaker_blocks": sum(text in blocks and text not in train_cls for text in test.texts)}
    test_lm = {name: {"lines": len(lines), "in_train_cls": sum(line in train_cls for line in lines),
                      "in_train_lm": sum(line in train_lm for line in lines)}
               for name, lines in ((name, lines_of(text)) for name, text in speeches.test_lm.items())}
    train = {"train_cls_segments": len(speeches.train_cls.texts), "train_cls_in_train_lm": sum(t in train_lm for t in train_cls),
             "train_cls_distinct": len(train_cls), "train_lm_lines": len(train_lm_lines),
             "train_lm_lines_in_train_cls": len(train_lm_lines & train_cls), "train_lm_lines_in_speaker_blocks": len(blocks)}
    return {"test_cls": test_cls, "test_lm": test_lm, "train": train}


def format_audit(report: dict) -> str:
    """The audit as a few readable lines."""
    cls, train = report["test_cls"], report["train"]
    lines = [f"test_CLS: {cls['segments']} segments; {cls['in_train_cls']} in train_CLS.tsv "
             f"({cls['in_train_cls_same_label']} with the same label), {cls['in_train_lm']} in train_LM.txt "
             f"({cls['in_train_lm_as_line']} as a whole line), {cls['in_neither']} in neither"]
    lines += [f"test_LM_{name}: {c['lines']} lines; {c['in_train_cls']} are train_CLS segments "
              f"({100 * c['in_train_cls'] / c['lines']:.0f}%), {c['in_train_lm']} in train_LM.txt"
              for name, c in report["test_lm"].items()]
    lines.append(f"train_CLS vs train_LM: {train['train_cls_in_train_lm']} of {train['train_cls_distinct']} distinct "
                 f"segments occur in train_LM.txt; {train['train_lm_lines_in_train_cls']} of {train['train_lm_lines']} "
                 "distinct train_LM lines are train_CLS segments")
    lines.append(f"speaker blocks: {train['train_lm_lines_in_speaker_blocks']} distinct train_LM lines "
                 "sit between two train_CLS segments of one president; "
                 f"{cls['unseen_in_speaker_blocks']} of the test_CLS segments not in train_CLS.tsv are among them")
    return "\n".join(lines)


def encode_segments(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Token ids truncated to `block_size` and right-padded with `<pad>`: (N, block_size)."""
    ids = torch.full((len(texts), block_size), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)[:block_size]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


def shuffled_batches(num_items: int, batch_size: int, generator: torch.Generator):
    """Index tensors of one shuffled epoch (the last batch may be smaller)."""
    order = torch.randperm(num_items, generator=generator)
    return order.split(batch_size)


def random_windows(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator):
    """A batch of random (input, target) windows from a 1-D token stream: (B, T), (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    inputs = data[starts[:, None] + offsets]  # (B, T)
    targets = data[starts[:, None] + offsets + 1]  # (B, T)
    return inputs, targets


class EpochBatches:
    """Endless shuffled epochs of (ids, labels) batches, whose place in the data order can be saved and restored."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.ids, self.labels, self.batch_size, self.generator = ids, labels, batch_size, generator
        self.epoch_start, self.order, self.position = None, [], 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == len(self.order):  # a new epoch draws its order only when its first batch is asked for
            self.epoch_start = self.generator.get_state()
            self.order, self.position = shuffled_batches(len(self.ids), self.batch_size, self.generator), 0
        index = self.order[self.position]
        self.position += 1
        return self.ids[index], self.labels[index]

    def state_dict(self) -> dict:
        """The generator as it stood before this epoch's shuffle, and the batches of it already given."""
        return {"epoch_start": self.epoch_start, "position": self.position}

    def load_state_dict(self, state: dict):
        if state["epoch_start"] is not None:
            self.generator.set_state(state["epoch_start"])
            self.order = shuffled_batches(len(self.ids), self.batch_size, self.generator)
            self.epoch_start = state["epoch_start"]
        self.position = state["position"]


def drop_tokens(ids: torch.Tensor, rate: float, generator: torch.Generator, replacement: int = UNK_ID,
                pad_id: int = PAD_ID) -> torch.Tensor:
    """A copy of (B, T) ids with each non-padding token replaced by `replacement` with probability `rate`."""
    dropped = (torch.rand(ids.shape, generator=generator) < rate) & (ids != pad_id)  # (B, T)
    return ids.masked_fill(dropped, replacement)


TOKEN_DROPOUT_SEED = 7919  # the dropout draws' generator: seed + this, a stream apart from the shuffle's


def token_dropout(rate: float):
    """A wrap_batches hook for training.train_classifier: TokenDropout at `rate` (the classifier-gap study's)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"token dropout must be in [0, 1), got {rate}")
    return lambda batches, seed: TokenDropout(batches, rate, torch.Generator().manual_seed(seed + TOKEN_DROPOUT_SEED))


class TokenDropout:
    """The (ids, labels) batches of another batch iterator, with token dropout (drop_tokens) on the ids.

    Dropped words become <unk> rather than disappear: the word vocabulary is built from the training text, so
    <unk> never occurs in training and its embedding stays at its initial value, yet it stands for every
    out-of-vocabulary word of the test segments; replacing trains it as "some word the model cannot read"."""

    def __init__(self, batches, rate: float, generator: torch.Generator):
        self.batches, self.rate, self.generator = batches, rate, generator

    def __iter__(self):
        return self

    def __next__(self):
        ids, labels = next(self.batches)
        return drop_tokens(ids, self.rate, self.generator), labels

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.batches.load_state_dict(state["batches"])
        self.generator.set_state(state["generator"])


class WindowBatches:
    """Endless batches of random windows of a token stream (see random_windows), with a savable generator."""

    def __init__(self, stream: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator):
        self.stream, self.block_size, self.batch_size, self.generator = stream, block_size, batch_size, generator

    def __iter__(self):
        return self

    def __next__(self):
        return random_windows(self.stream, self.block_size, self.batch_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------- data noising (Xie et al., 2017)
# Each input token x is replaced, with probability gamma(x), by a draw from a proposal distribution q; the targets
# are never noised. In the n-gram view, a model trained on noised contexts interpolates its prediction from the
# true context with the prediction from a context whose word was resampled: unigram noising corresponds to
# interpolating with a lower order (Jelinek-Mercer), blank noising to backing off to a shorter context, and the
# Kneser-Ney variant noises a word more the more distinct words follow it, with proposals by how many distinct
# words precede each word (its continuation count).


def unigram_noise(stream: torch.Tensor, vocab_size: int, gamma: float):
    """(gamma per id, proposal): every input at gamma, replaced by a draw from the training text's unigram frequencies."""
    return torch.full((vocab_size,), gamma), torch.bincount(stream, minlength=vocab_size).double()


def blank_noise(stream: torch.Tensor, vocab_size: int, gamma: float):
    """(gamma per id, proposal): every input at gamma, replaced by the placeholder `<unk>` (never in the training
    text, since the vocabulary covers it; at test time it stands for words outside the vocabulary)."""
    return torch.full((vocab_size,), gamma), torch.nn.functional.one_hot(torch.tensor(UNK_ID), vocab_size).double()


def kneser_ney_noise(stream: torch.Tensor, vocab_size: int, gamma: float):
    """(gamma per id, proposal): a word x is noised at gamma * N1+(x, .) / c(x) (the share of its occurrences that
    begin a distinct bigram), replaced by a draw from q(w) ~ N1+(., w), the number of distinct words before w."""
    pairs = torch.unique(stream[:-1] * vocab_size + stream[1:])  # the distinct bigrams, as first * V + second
    followers = torch.bincount(pairs // vocab_size, minlength=vocab_size).double()  # N1+(x, .)
    predecessors = torch.bincount(pairs % vocab_size, minlength=vocab_size).double()  # N1+(., w)
    counts = torch.bincount(stream[:-1], minlength=vocab_size).double()
    return gamma * followers / counts.clamp(min=1), predecessors


INPUT_NOISES = {"unigram": unigram_noise, "blank": blank_noise, "kneser_ney": kneser_ney_noise}  # or "none"


class NoisedBatches:
    """Batches of another iterator whose inputs are noised: each input id x replaced with probability gamma[x] by a
    draw from `proposal` (unnormalised weights over the vocabulary); the targets are left as they are."""

    def __init__(self, batches, gamma: torch.Tensor, proposal: torch.Tensor, generator: torch.Generator):
        self.batches, self.gamma, self.proposal, self.generator = batches, gamma, proposal, generator

    def __iter__(self):
        return self

    def __next__(self):
        inputs, targets = next(self.batches)
        replaced = torch.rand(inputs.shape, generator=self.generator) < self.gamma[inputs]  # (B, T)
        draws = torch.multinomial(self.proposal, inputs.numel(), replacement=True, generator=self.generator)
        return torch.where(replaced, draws.view_as(inputs), inputs), targets

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.batches.load_state_dict(state["batches"])
        self.generator.set_state(state["generator"])


NOISE_SEED_OFFSET = 1_000_003  # the noise's generator is not the windows' (same seed, unrelated draws)


def noised_batches(batches, kind: str, gamma: float, stream: torch.Tensor, vocab_size: int, seed: int):
    """`batches` with their inputs noised by INPUT_NOISES[kind] at gamma, drawn from a generator of `seed`
    (the batches themselves for kind "none" or gamma 0)."""
    if kind == "none" or gamma == 0:
        return batches
    gamma_per_id, proposal = INPUT_NOISES[kind](torch.as_tensor(stream), vocab_size, gamma)
    return NoisedBatches(batches, gamma_per_id, proposal, torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET))


def input_noise(kind: str, gamma: float):
    """A wrap_batches hook for training.train_language_model: its inputs noised by INPUT_NOISES[kind] at gamma."""
    if kind not in INPUT_NOISES or not 0.0 <= gamma < 1.0:
        raise ValueError(f"input noise must be one of {', '.join(INPUT_NOISES)} at a rate in [0, 1), got {kind!r} at {gamma}")
    return lambda batches, stream, config, seed: noised_batches(batches, kind, gamma, stream, config.vocab_size, seed)


def consecutive_windows(data: torch.Tensor, block_size: int):
    """Non-overlapping (input, target) windows that predict every token after the first once.

    Yields the full windows as one (N, T) batch, then the shorter remainder, if any, as (1, T').
    """
    num_targets = len(data) - 1
    full = num_targets // block_size * block_size
    if full:
        yield data[:full].view(-1, block_size), data[1 : full + 1].view(-1, block_size)  # (N, T)
    if full < num_targets:
        yield data[full:-1].unsqueeze(0), data[full + 1 :].unsqueeze(0)  # (1, T')


def stratified_split(labels: list[int], fraction: float, seed: int = 0):
    """Index tensors (kept, held_out): `fraction` of each class held out, chosen by a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    held_out = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held_out.append(members[: round(fraction * len(members))])
    held_out = torch.cat(held_out).sort().values
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held_out] = False
    return kept.nonzero().flatten(), held_out


def split_lines(text: str, fraction: float) -> tuple[str, str]:
    """(first lines, last `fraction` of the lines): a held-out tail for language-model validation."""
    if fraction <= 0:
        return text, ""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(fraction * len(lines)))
    return "".join(lines[:cut]), "".join(lines[cut:])
