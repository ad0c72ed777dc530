"""Shared fixtures: where the course data is, small slices of it written at test time, a hand-made dataset,
and a guard that gives every test torch's thread count back as it found it."""

import os
from pathlib import Path

import pytest
import torch

from dataset import LabelledSegments, Speeches

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SPEECHES_DATA", ROOT.parent / "shared" / "speechesdataset"))


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Code under test may set torch's thread count (`main.py sweep` does); later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train_CLS.tsv").is_file():
        pytest.fail(f"course data not found at {DATA_DIR}; set SPEECHES_DATA to the folder holding the six files")
    return DATA_DIR


def write_slice(source: Path, target: Path, lines: dict[str, int]) -> Path:
    """Copy the first N lines of each course file into `target` (kept in the test's temp folder)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, count in lines.items():
        text = (source / name).read_text(encoding="utf-8").splitlines()[:count]
        (target / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return target


SLICE = {"train_CLS.tsv": 400, "test_CLS.tsv": 120, "train_LM.txt": 250,
         "test_LM_obama.txt": 40, "test_LM_wbush.txt": 40, "test_LM_hbush.txt": 40}


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
