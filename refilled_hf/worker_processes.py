"""The worker processes of a run: how many it starts, and what they do first (end with the
process that started them, and leave the signals meant for the run to it).

A Ctrl-C at a terminal reaches every process of the foreground process group, and SLURM's
notice before a kill (``scancel``, preemption, ``--signal``) every process of the job step:
the DataLoader workers that read the batches as well as the training process. PyTorch ends a
worker on a SIGTERM from anyone but its parent, and the training process then failed on its
next batch ("DataLoader worker ... is killed by signal: Terminated") instead of checkpointing
the step and stopping (:mod:`refilled_hf.preemption`). A worker started through
:func:`loader_worker_init` ignores those signals; the training process stops its workers
itself, and a worker it leaves behind (the training process killed alone, by ``kill -9`` or
the kernel's out-of-memory killer) is killed with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["cores_per_process", "default_loader_workers", "end_with_parent", "fork_context", "loader_worker_init"]

#: at most this many DataLoader workers by default (default_loader_workers), as many as the
#: throughput benchmarks gave the H200's worker path (benchmarks/results/throughput_cuda.md)
MAX_LOADER_WORKERS = 8

#: prctl's option that signals a process when its parent ends (linux/prctl.h)
_PR_SET_PDEATHSIG = 1
#: what a Ctrl-C and a cluster's notices send: the training process stops for them, its workers do not
_RUN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def fork_context() -> multiprocessing.context.BaseContext | None:
    """The ``fork`` start method, on Linux: a worker starts at once, with nothing to import
    (as DataLoader workers do there). Elsewhere (macOS, Windows) a worker would import the
    library anew and, from a script without a ``__main__`` guard, run the script again: None
    there (decoding stays in one process, the DataLoader's default count is 0)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return multiprocessing.get_context("fork")
    except ValueError:
        return None


def cores_per_process() -> int:
    """The cores this process may use (its CPU affinity, which cluster schedulers set),
    shared with the other processes of the launch on this machine (``LOCAL_WORLD_SIZE``, as
    torchrun and Accelerate set it); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        local = 1
    return max(1, cores // local)


def default_loader_workers(on_accelerator: bool) -> int:
    """DataLoader workers of the worker path when ``--dataloader_num_workers`` is unset. On an
    accelerator, the host's work for a batch (decoding, timm's PIL transforms: several ms per
    photo at 224 px) would otherwise run in the training process, between steps, while the
    accelerator waits: :func:`cores_per_process` less the one the training process uses, at
    most :data:`MAX_LOADER_WORKERS`. 0 (load in the training process) on the CPU, where workers
    take cores from the training's own threads (on 2 cores, 2 workers made a 96-px run about
    20 % slower than none), and where workers would not be forked (:func:`fork_context`)."""
    if not on_accelerator or fork_context() is None:
        return 0
    return max(1, min(cores_per_process() - 1, MAX_LOADER_WORKERS))


def end_with_parent(parent: int) -> None:
    """In a worker process: have the kernel kill it when ``parent`` (the process that
    started it) ends (Linux; elsewhere nothing changes), and end now if it already has."""
    with contextlib.suppress(OSError, AttributeError):  # (prctl is Linux's)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # (gone before the line above took effect)
        os._exit(1)


def _start_loader_worker(worker_id: int, parent: int, then: Callable[[int], None] | None) -> None:
    for number in _RUN_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    end_with_parent(parent)
    if then is not None:
        then(worker_id)


def loader_worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn``, called in each worker of this process's loader: it
    ignores a Ctrl-C, SIGTERM and SIGUSR1 (the training process stops for them), ends with
    this process, then runs ``then`` (transformers' seeding, a user's own). Picklable, for
    a loader that spawns its workers."""
    return functools.partial(_start_loader_worker, parent=os.getpid(), then=then)
