"""Checkpoints that resume a training exactly, and a clean stop on Ctrl-C or SIGTERM.

Kept out of training.py, which holds what is learned; this module holds how a run survives being stopped
(utilities.save_checkpoint, by contrast, saves a trained model to be used, not a training to be continued).
A checkpoint is one file, DIR/state.pt, written by torch.save under a temporary name and renamed into place,
so a crash mid-write leaves the previous checkpoint whole. torch.save rather than safetensors: the optimiser's
and the schedule's states are nested dictionaries of tensors, counters and floats, which safetensors (flat
tensors only) would need a hand-written codec for; loading uses weights_only=True, so no arbitrary objects
are unpickled. The run's identity (configuration, data, code version) is stored beside the tensors and checked
before anything is restored.
"""

import hashlib
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from runtime.parallel import SINGLE, Parallel, gather
from utilities import atomic_write

STATE_FILE = "state.pt"
# the modules whose code decides the numbers a run produces: a checkpoint written by other code does not resume
# (paths from the repository's root)
CODE_FILES = ("transformer.py", "tokenizer.py", "dataset.py", "training.py", "runtime/resume.py", "runtime/parallel.py")


class ResumeError(ValueError):
    """A checkpoint that cannot resume this run; the message is one line naming what differs."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a checkpoint was written to `directory`."""

    def __init__(self, signal_number: int, step: int, steps: int, directory: Path):
        super().__init__(f"stopped by {signal.Signals(signal_number).name} after step {step} of {steps}")
        self.signal_number, self.step, self.steps, self.directory = signal_number, step, steps, directory

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it (130 for Ctrl-C)."""
        return 128 + self.signal_number


def code_version() -> dict[str, str]:
    """A short hash of each module in CODE_FILES."""
    root = Path(__file__).resolve().parent.parent
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:16] for name in CODE_FILES}


def identity(**parts) -> dict:
    """What a checkpoint must match to resume a run: `parts` (configuration, data, ...), the code and torch."""
    return {**parts, "code": code_version(), "torch": str(torch.__version__)}  # a plain str: weights_only loads no TorchVersion


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def difference(saved: dict, current: dict) -> str | None:
    """One phrase naming the first way `saved` differs from `current`, or None if they match."""
    saved, current = _flatten(saved), _flatten(current)
    for key in sorted(saved.keys() | current.keys()):
        if saved.get(key) != current.get(key):
            if key.startswith("code."):
                return f"it was written by another code version ({key[5:]} has changed)"
            return f"{key} is {saved.get(key)!r} there, {current.get(key)!r} here"
    return None


def _save_file(state: dict, temporary: str):
    torch.save(state, temporary)
    with open(temporary, "rb") as handle:  # on disk before the rename, so a power cut cannot leave it empty
        os.fsync(handle.fileno())


class Checkpointer:
    """Writes every `every` steps (0: only when stopped by a signal) and restores model, optimiser, schedule,
    data order, random-number states and the loop's progress."""

    def __init__(self, directory: Path, every: int, run_identity: dict, parallel: Parallel = SINGLE):
        self.directory, self.every, self.identity, self.parallel = Path(directory), every, run_identity, parallel

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, components: dict, progress: dict) -> Path:
        """Write the checkpoint: process 0 writes, as the processes hold the same state but for their random numbers."""
        path = self.directory / STATE_FILE
        rng = gather({"torch": torch.get_rng_state(),  # each process's dropout draws its own numbers
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, self.parallel)
        if not self.parallel.is_main:
            return path
        state = {"identity": self.identity, "step": step, "progress": progress, "rng": rng,
                 "components": {name: component.state_dict() for name, component in components.items()}}
        atomic_write(path, lambda temporary: _save_file(state, temporary))
        return path

    def load(self, directory: Path, components: dict) -> tuple[int, dict]:
        """Restore `components` and the random-number states from `directory`; return (step, progress)."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ResumeError(f"{path}: no checkpoint there (--resume takes the folder a checkpoint was written to)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or corrupt file fails in many ways
            raise ResumeError(f"{path}: unreadable checkpoint, truncated or corrupt ({type(error).__name__})") from error
        problem = difference(state.get("identity", {}), self.identity)
        if problem:
            raise ResumeError(f"{path} cannot resume this run: {problem}")
        for name, component in components.items():
            component.load_state_dict(state["components"][name])
        rng = state["rng"][self.parallel.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return state["step"], state["progress"]


class StopRequest:
    """While active, SIGINT and SIGTERM ask the loop to stop after its current step instead of killing it;
    a second Ctrl-C stops at once."""

    def __init__(self, enabled: bool, announce: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()  # only there can Python catch signals
        self.announce, self.signal_number, self.previous = announce, None, {}

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signal_number = number
        if self.announce:
            print(f"\n{signal.Signals(number).name}: finishing this step, then writing a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
