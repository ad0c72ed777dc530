"""The one shape of a part-three study: a flag and its options, a run that returns results, tables and a plot.

Each study module ends with `STUDY = Study(...)`; main.py lists them in its STUDIES table, builds the part-three
flags from each row and dispatches to `run`, so a new study is one module and one row. Options are described here
as plain values; main.py alone turns them into argparse options.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from training import Run


@dataclass(frozen=True)
class Option:
    """One option of a study, on the command line as --NAME (underscores become dashes)."""

    name: str
    kind: type  # int, str or bool (a switch)
    default: object
    help: str
    minimum: int | None = None  # an int's smallest value, checked before any training
    parts: tuple[str, ...] = ("three",)  # the parts that take it (part three through its study's flag)


@dataclass
class Context:
    """What part three hands a study: the seeds, the worker count, the study's own options, the comparison's models."""

    seed: int  # the command's --seed: the first seed of every study
    seeds: int  # seeds per configuration (--seeds), from `seed` on
    workers: int  # worker processes for studies that train many models (1: in this process)
    options: dict = field(default_factory=dict)  # this study's Option values, by name
    models: dict = field(default_factory=dict)  # the comparison's trained models: "decoder absolute", "encoder alibi", ...


def no_tables(results: dict) -> dict[str, str]:
    """A study without tables of its own."""
    return {}


@dataclass(frozen=True)
class Study:
    """A part-three study: switched on by --FLAG, its results under KEY in part_three.json."""

    flag: str
    key: str
    title: str  # printed as "== TITLE" before it runs
    help: str
    run: Callable[[Run, Context], tuple[dict, list[str]]]  # (results for the JSON, attention-check failures)
    tables: Callable[[dict], dict[str, str]] = no_tables  # file stem -> Markdown, printed and written as OUT/STEM.md
    plot: Callable[[dict, Path], None] | None = None  # draws the study's PNGs into OUT (skipped with --no-plots)
    options: tuple[Option, ...] = ()
    check: Callable[[dict], None] | None = None  # raises ValueError for bad options, before any training


# options several studies read: the Context's seeds and workers
SHARED_OPTIONS = (
    Option("seeds", int, 3, "seeds per configuration, from --seed on (--explore, --improve)", minimum=1),
    Option("workers", int, None, "worker processes (default: one per core, at most 2; 1: train in this process)",
           minimum=1),
)
