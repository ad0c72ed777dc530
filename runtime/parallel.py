"""Data parallel training across the processes that torchrun starts: who this process is, its share of a batch,
and the few collective operations the training loop needs.

Kept apart from training.py so that the loop reads the same with one process or many: with one process
(plain `python main.py`) every function here is a no-op and nothing from torch.distributed is touched.
"""

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Parallel:
    """This process's rank among world_size processes; the default is one process alone."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # where collective operations put their tensors (NCCL needs CUDA)

    @property
    def is_main(self) -> bool:
        """Process 0: the one that prints, evaluates and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = Parallel()


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (it sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def start(device: torch.device) -> tuple[Parallel, torch.device]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); return this process and its device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(dist.get_rank(), dist.get_world_size(), device), device


def stop():
    """Leave the process group, if one was joined, once every process has reached this point."""
    if not dist.is_initialized():
        return
    # a gloo connection torn down while its peer still uses it aborts that process at exit ("terminate called
    # without an active exception", about one run in three here); a peer that has died already fails the barrier
    with contextlib.suppress(RuntimeError):
        dist.barrier()
    # a DistributedDataParallel left in a reference cycle holds the group until the interpreter's teardown, where
    # freeing it can abort the process too: collected now, while the interpreter is whole
    gc.collect()
    dist.destroy_process_group()


def wrap(model: torch.nn.Module, parallel: Parallel) -> torch.nn.Module:
    """The module to train: DistributedDataParallel around `model` with several processes, else `model` itself."""
    if not parallel.active:
        return model
    device_ids = [parallel.device.index] if parallel.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(trainer: torch.nn.Module, sync: bool):
    """A context where DDP only accumulates gradients locally (no all-reduce) unless `sync`."""
    if sync or not isinstance(trainer, DistributedDataParallel):
        return contextlib.nullcontext()
    return trainer.no_sync()


def micro_batches(tensor: torch.Tensor, parallel: Parallel, grad_accum: int) -> tuple[torch.Tensor, ...]:
    """This process's `grad_accum` micro-batches of a global batch (rows split as evenly as they go; some may be empty)."""
    # the whole batch, whatever it is (span corruption's batches are (source, target) pairs)
    if parallel.world_size * grad_accum == 1:
        return (tensor,)
    chunks = tensor.tensor_split(parallel.world_size * grad_accum)
    return chunks[parallel.rank * grad_accum:(parallel.rank + 1) * grad_accum]


def all_sum(values: list[float], parallel: Parallel) -> list[float]:
    """Each value summed over every process (the values themselves with one process)."""
    if not parallel.active:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=parallel.device)
    dist.all_reduce(summed)
    return summed.tolist()


def from_main(value, parallel: Parallel):
    """Process 0's `value`, on every process (a picklable object: an evaluation row)."""
    if not parallel.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=parallel.device)
    return box[0]


def gather(value, parallel: Parallel) -> list:
    """Every process's `value`, in rank order, on every process ([value] with one process)."""
    if not parallel.active:
        return [value]
    values = [None] * parallel.world_size
    dist.all_gather_object(values, value)
    return values
