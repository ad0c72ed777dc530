"""What a training shows and records as it goes: a progress bar with an ETA on a terminal, a JSON-lines log of
its steps and evaluations, and TensorBoard event files when tensorboard happens to be installed.

Kept out of training.py so that the loop makes one call per step and per evaluation whatever is switched on.
"""

import contextlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from utilities import write_text


def tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter for `log_dir`, or None when tensorboard is not installed (an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def _keep_until(path: Path, step: int):
    """Drop the lines of a JSON-lines log that come after `step`: a resumed run writes them again."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        write_text(path, "".join(line for line in lines if json.loads(line)["step"] <= step))


class StepLogger:
    """Progress bar (`show_bar`), JSON-lines log and TensorBoard events of one training of `total` steps,
    starting after step `start` (0, or where a resumed run stood)."""

    def __init__(self, total: int, start: int = 0, log_dir: Path | None = None, name: str = "training",
                 show_bar: bool = False):
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, leave=False) if show_bar else None
        self.log, self.tensorboard = None, None
        if log_dir is not None:
            path = Path(log_dir) / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            _keep_until(path, start)
            self.log = path.open("a", encoding="utf-8")
            self.tensorboard = tensorboard_writer(Path(log_dir) / name)

    def __enter__(self) -> "StepLogger":
        return self

    def __exit__(self, *exception):
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _write(self, row: dict):
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()  # a stopped run keeps every line it logged

    def step(self, step: int, loss: float, learning_rate: float):
        """One optimiser step: its mean training loss and the learning rate it used."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.log is not None:
            self._write({"step": step, "loss": loss, "learning_rate": learning_rate,
                         "seconds": round(time.perf_counter() - self.started, 3)})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", loss, step)
            self.tensorboard.add_scalar("train/learning_rate", learning_rate, step)

    def evaluation(self, step: int, row: dict):
        """One evaluation row, as the training's evaluate() returned it."""
        if self.log is not None:
            self._write({"step": step, "evaluation": row})
        if self.tensorboard is not None:
            for key, value in _numbers(row):
                self.tensorboard.add_scalar(f"evaluation/{key}", value, step)

    def printing(self):
        """A context in which lines printed to the terminal do not tear the progress bar."""
        return self.bar.external_write_mode(file=sys.stdout) if self.bar is not None else contextlib.nullcontext()


def _numbers(row: dict, prefix: str = ""):
    """(dotted key, value) of every number in a nested evaluation row."""
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, int | float):
            yield f"{prefix}{key}", value
