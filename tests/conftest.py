"""Shared fixtures: the data (the course's files where SPEECHES_DATA or ../shared/speechesdataset holds them, else the
public-domain stand-in built at test time), small slices of it, a hand-made dataset, and a guard that gives every
test torch's thread count back as it found it.

A fresh clone has no course files (they are not ours to ship): every test then runs on the stand-in, except those
that check figures of the course's own files, which ask for `course_data` and are skipped, saying why."""

import os
from pathlib import Path

import pytest
import torch

from dataset import DATA_FILES, LabelledSegments, Speeches
from runtime import corpus

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SPEECHES_DATA", ROOT.parent / "shared" / "speechesdataset"))


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Code under test may set torch's thread count (`main.py sweep` does); later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def has_course_data() -> bool:
    """Whether DATA_DIR holds the six course files."""
    return all((DATA_DIR / name).is_file() for name in DATA_FILES)


@pytest.fixture(scope="session")
def course_data() -> Path:
    """The course's six files; the test is skipped without them."""
    if not has_course_data():
        pytest.skip(f"needs the course's files, not found at {DATA_DIR} (set SPEECHES_DATA to the folder holding them)")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """A corpus cache holding the stand-in, built once for the whole test run."""
    root = tmp_path_factory.mktemp("corpora")
    corpus.ensure("sotu-standin", root, log=lambda *a: None)
    return root


@pytest.fixture(scope="session")
def standin(cache) -> Path:
    """The public-domain stand-in's six files."""
    return cache / "sotu-standin"


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    """Six files in the course's formats: the course's where they are, else the stand-in."""
    return DATA_DIR if has_course_data() else request.getfixturevalue("standin")


def write_slice(source: Path, target: Path, lines: dict[str, int]) -> Path:
    """Copy the first N lines of each course file into `target` (kept in the test's temp folder), a language-model
    file's no further than the line that reaches its SLICE_WORDS."""
    target.mkdir(parents=True, exist_ok=True)
    for name, count in lines.items():
        text, words = [], 0
        for line in (source / name).read_text(encoding="utf-8").splitlines()[:count]:
            if words >= SLICE_WORDS.get(name, float("inf")):
                break
            text.append(line)
            words += len(line.split())
        (target / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return target


SLICE = {"train_CLS.tsv": 400, "test_CLS.tsv": 120, "train_LM.txt": 250,
         "test_LM_obama.txt": 40, "test_LM_wbush.txt": 40, "test_LM_hbush.txt": 40}
# the stand-in's lines are paragraphs of addresses, 3-5 times a course line: a cap on words keeps its slice as small
# as the course's (whose slice these caps leave whole: 4,543 words of train_LM.txt, 595-708 of each test file)
SLICE_WORDS = {"train_LM.txt": 5_000, "test_LM_obama.txt": 800, "test_LM_wbush.txt": 800, "test_LM_hbush.txt": 800}


@pytest.fixture(scope="session")
def small_data(data_dir, tmp_path_factory) -> Path:
    """A slice of the course data: fast end-to-end runs."""
    return write_slice(data_dir, tmp_path_factory.mktemp("speeches"), SLICE)


@pytest.fixture
def copy_of_small_data(small_data, tmp_path) -> Path:
    """A private copy of the slice that a test may break."""
    return write_slice(small_data, tmp_path / "data", SLICE)


@pytest.fixture
def tiny_speeches() -> Speeches:
    """Five test segments whose overlaps are worked out by hand in the tests that use them."""
    train_cls = LabelledSegments(["One two.", "Three four.", "Five six."], [0, 1, 2])
    test_cls = LabelledSegments(["One two.", "Three four.", "Seven eight.", "Nine ten.", "One two."], [0, 2, 1, 0, 0])
    train_lm = "Start. Seven eight. End.\nThree four.\nOne two. And more.\n"
    test_lm = {"obama": "One two.\nSomething new.\n", "wbush": "Five six.\nThree four.\n", "hbush": "Nothing.\n"}
    return Speeches(train_cls, test_cls, train_lm, test_lm)
