"""Several processes, one model: the rank helpers `sdar train` needs under torchrun / accelerate launch.

A launcher starts one process per device and tells each who it is through the environment (RANK,
WORLD_SIZE, LOCAL_RANK). Every helper here is a no-op returning the one-process answer when
WORLD_SIZE is unset or 1, so the single-process code path is the same code.

What the ranks share and how:
- the run directory: only the main process (RANK 0) checks, creates and writes it; the others wait
  at a barrier and learn its answer (resume checkpoint, or the error) by broadcast;
- each step's rollout: tasks_per_step tasks split as whole groups, ids global (see `check_world_fits`);
- decisions (stop, skip a non-finite update, abort): reduced over all ranks, so every rank takes the same.

The process group is the one accelerate (and through it TRL's Trainer) uses: `start` initialises it via
accelerate's PartialState, which the Trainer later finds already set up.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError

#: how long a rank waits for the others at a collective (rollouts of big models can be slow); the
#: transformers default ddp_timeout
COLLECTIVE_TIMEOUT = timedelta(seconds=1800)


class DistributedConfigError(ConfigError):
    """The run cannot be split over the launched processes; the message says what to change."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def refuse_several(command: str) -> None:
    """`sdar eval` and `inspect-gates` run in one process: say so when a launcher started several."""
    if is_distributed():
        raise DistributedConfigError(
            f"sdar {command} runs in one process, but it was launched as {world_size()} processes "
            f"(WORLD_SIZE={world_size()}). Run it without torchrun / accelerate launch: plain `sdar {command} ...`."
        )


def check_world_fits(tasks_per_step: int, group_size: int, micro_batches: int, updates_per_rollout: int = 1) -> None:
    """Each rank plays tasks_per_step / WORLD_SIZE whole groups and splits its episodes into
    updates_per_rollout x micro_batches chunks."""
    size = world_size()
    if tasks_per_step % size:
        raise DistributedConfigError(
            f"rollout.tasks_per_step ({tasks_per_step}) must be divisible by the number of processes ({size}): "
            f"each process plays whole groups of rollout.group_size episodes. Set rollout.tasks_per_step to a "
            f"multiple of {size}, or launch {_divisors_hint(tasks_per_step)} processes."
        )
    per_rank = tasks_per_step // size * group_size
    if per_rank % (micro_batches * updates_per_rollout):
        chunks = "train.micro_batches" if updates_per_rollout == 1 else "train.updates_per_rollout x train.micro_batches"
        raise DistributedConfigError(
            f"{chunks} ({micro_batches * updates_per_rollout}) must divide each process's episodes per step "
            f"(rollout.tasks_per_step / processes x rollout.group_size = {tasks_per_step} / {size} x {group_size} "
            f"= {per_rank}). Lower train.micro_batches or raise rollout.tasks_per_step."
        )


def _divisors_hint(tasks_per_step: int) -> str:
    return " or ".join(str(n) for n in range(1, tasks_per_step + 1) if tasks_per_step % n == 0)


def start(cpu: bool) -> None:
    """Initialise the process group (gloo on CPU, nccl on CUDA) once; nothing in a single process."""
    if not is_distributed() or dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)
    # torch asks for destroy_process_group before exit: left to interpreter teardown, gloo's threads can
    # abort a rank that finished its work ("terminate called without an active exception", seen in CI)
    atexit.register(_stop)


def _stop() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # exiting anyway: a group another rank already tore down is not worth a traceback
            pass


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where collective tensors live: nccl only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_main(value: Any) -> Any:
    """The main process's `value` on every rank (any picklable object)."""
    if not _active():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums of `values` over all ranks (float64, so counts stay exact)."""
    if not _active():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def max_over_ranks(values: Sequence[float]) -> list[float]:
    if not _active():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one: a decision all ranks take together."""
    return max_over_ranks([1.0 if flag else 0.0])[0] > 0


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` (any picklable object), in rank order, on the main process; None on the others."""
    if not _active():
        return [value]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
