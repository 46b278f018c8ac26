"""Stage-1 mining over the global batch when several processes train.

Each process embeds its own share of the batch. :func:`gather_for_mining` concatenates
the shares of every process in rank order, the student's with an autograd-aware
all-gather (:class:`_GatherWithGradient`, whose backward sums each share's gradient from
every process back to its owner), the teacher's embeddings and the labels with a plain
one. Every process then mines and computes the same loss on the same global batch.
Backward gives each process ``world_size`` times its share of the gradient (every process
back-propagates the same loss), and DDP divides the summed parameter gradients by
``world_size``: the update equals that of one process on the whole batch
(``tests/test_distributed.py`` checks it to 1e-5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "gather_batch",
    "gather_for_mining",
    "is_distributed",
    "own_rows",
    "processes_and_rank",
    "share_rank0_buffers",
]


def processes_and_rank() -> tuple[int, int]:
    """``(number of processes, this process's rank)``; ``(1, 0)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_distributed() -> bool:
    """Whether several processes train together."""
    return processes_and_rank()[0] > 1


def share_rank0_buffers(module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers of ``module`` (batch-norm statistics above all).

    Training updates each process's statistics from its own batches, so they drift apart
    (DDP broadcasts rank 0's only at the start of each training forward, and not at all
    under ``--ddp_broadcast_buffers false``); rank 0's are the ones checkpoints and the
    export hold. An evaluation that shares the images among the processes must measure
    that model on every share. Training forwards use batch statistics, so this changes
    no gradient. Every buffer, not only timm's ``distribute_bn``'s ``running_mean`` /
    ``running_var``: ``num_batches_tracked`` (batch norm's average under
    ``momentum=None``) and any other layer's state count too."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, 0)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward returns to each process the sum, over every process, of
    the gradient of its own rows. Written here because torch's
    ``torch.distributed.nn.functional.all_gather`` is deprecated (a FutureWarning at every
    stage) in favour of a private module (``torch.distributed._functional_collectives``)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # an all-reduce of the whole gradient, of which this process keeps its rows: what a
        # reduce-scatter does, on every backend (gloo has none), for a few hundred KB a step
        rows = grad.shape[0] // dist.get_world_size()
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_for_mining(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch ``(student, teacher, labels)``, rank by rank; gradients flow back
    to this process's rows of ``student``. Every process must pass the same batch size
    (Accelerate's even batches). Outside a multi-process run, the inputs unchanged."""
    if not is_distributed():
        return student, teacher, labels
    return _GatherWithGradient.apply(student), _gather(teacher.detach()), _gather(labels)


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (rows of the global batch, without gradients), rank by
    rank: what stage 2 needs of the whole batch (its labels for the local classes, the
    teacher's outputs for per-batch centres or confidence weights). Every process must pass
    the same number of rows. Outside a multi-process run, ``tensor`` unchanged."""
    if not is_distributed():
        return tensor
    return _gather(tensor.detach())


def own_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """This process's ``rows`` rows of a tensor over the global batch (:func:`gather_batch`)."""
    _, rank = processes_and_rank()
    return tensor[rank * rows : (rank + 1) * rows]
