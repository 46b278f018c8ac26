"""What the worker processes of a run do first: end with the process that started them, and
leave the signals meant for the run to it.

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
import os
import signal
from collections.abc import Callable

__all__ = ["end_with_parent", "loader_worker_init"]

#: prctl's option that signals a process when its parent ends (linux/prctl.h)
_PR_SET_PDEATHSIG = 1
#: what a Ctrl-C and a cluster's notices send: the training process stops for them, its workers do not
_RUN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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
