"""A tiny classifier training that test_long_runs runs in one process and in two gloo processes.

A module of its own so that the spawned processes import only what the training needs (not main.py's studies).
"""

import os
from pathlib import Path

import torch

from dataset import EpochBatches
from runtime import parallel as data_parallel
from runtime.parallel import Parallel
from tokenizer import PAD_ID
from training import Harness, TrainingConfig, fit
from transformer import TransformerClassifier, TransformerConfig


def tiny_config(**changes) -> TransformerConfig:
    return TransformerConfig(vocab_size=30, block_size=8, n_embd=16, n_head=2, n_layer=2, ff_hidden=16, **changes)


def padded_batch(rows: int, generator) -> torch.Tensor:
    """Token ids right-padded to different lengths, so attention masks differ from row to row."""
    ids = torch.randint(2, 30, (rows, 8), generator=generator)
    for row in range(rows):
        ids[row, 1 + row % 7:] = PAD_ID
    return ids


def classifier_fit(parallel: Parallel):
    """The tiny classifier over 2 epochs of 23 padded segments in batches of 8 (7 in the last), 2 micro-batches."""
    generator = torch.Generator().manual_seed(1)
    ids, labels = padded_batch(23, generator), torch.randint(0, 3, (23,), generator=generator)
    torch.manual_seed(0)
    model = TransformerClassifier(tiny_config())
    batches = EpochBatches(ids, labels, 8, torch.Generator().manual_seed(0))
    training = TrainingConfig(learning_rate=1e-2, grad_accum=2)
    history = fit(model, batches, 6, 3, lambda step, recent: {"recent": recent}, training, torch.device("cpu"),
                  harness=Harness(parallel=parallel))
    return history, model


def run(rank: int, world_size: int, port: int, result_dir: str):
    """One of `world_size` gloo processes: train, then save the history and weights it ends with."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        history, model = classifier_fit(Parallel(rank, world_size, torch.device("cpu")))
        torch.save({"history": history, "weights": model.state_dict()}, Path(result_dir) / f"rank{rank}.pt")
    finally:
        data_parallel.stop()
    # what this test checks is written; the interpreter's teardown, where gloo's threads can still abort a process
    # now and then ("terminate called without an active exception"), is skipped
    os._exit(0)
