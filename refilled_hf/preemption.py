"""A SIGTERM (or SIGUSR1) while a stage trains: a checkpoint of the step, then a stop that says so.

Clusters warn a job before they kill it: SLURM's preemption, ``scancel`` and ``--signal=TERM@<s>``,
Kubernetes, and torchrun (``accelerate launch``), which passes the signal on to its workers,
all send SIGTERM, then SIGKILL after a grace period; jobs that requeue themselves often ask
SLURM for SIGUSR1 instead (``--signal=USR1@<s>``). By default Python dies at once, and a
resume redoes every step since the stage's last checkpoint. While a stage trains,
:class:`StopOnSignal` turns the first SIGTERM into a checkpoint at the end of the current
step (its weights, optimizer, scheduler and RNG states, as every checkpoint: the resume is
exact) and a stop; the run then exits with 128 + the signal's number, exporting nothing. A
second notice stops at once, as before.

Several processes stop at the same step: they agree at each logging step (a one-number
``all_reduce``, where transformers gathers the loss anyway), so no process waits on a
collective the others have left. transformers' own ``enable_jit_checkpoint`` is not used: it
may save before the optimizer applies a step's gradients, does not coordinate processes, and
its trainer returns as if training had finished.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

__all__ = ["StopOnSignal"]

logger = logging.getLogger(__name__)

#: the signals taken as a notice before a kill: SIGTERM, and SIGUSR1, which SLURM jobs that requeue
#: themselves ask for (``#SBATCH --signal=USR1@90``) and whose default action also kills at once
NOTICE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(TrainerCallback):
    """Checkpoint and stop a stage at the end of the step during which a SIGTERM came (see
    the module). ``received``: the signal's number, or None; ``stopped_at``: the step the
    stage stopped (and was checkpointed) at, or None where training ended first."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        #: where the stage stops, as the notice's warning says it (set as training begins)
        self._when = "at the end of this step"

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Take the notice signals while the block runs (from the main thread only: Python
        handles signals there; elsewhere nothing changes), then give them back."""
        if threading.current_thread() is threading.main_thread():
            for number in NOTICE_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is not None:  # a second notice: stop now, as without this handler
            self._restore()
            os.kill(os.getpid(), number)
            return
        self.received = number
        logger.warning(
            "%s received: the stage stops after a checkpoint %s (a second %s stops at once).",
            signal.Signals(number).name, self._when, signal.Signals(number).name,
        )  # fmt: skip

    @staticmethod
    def _agreement_steps(args: Any, state: Any) -> int:
        """How often several processes agree on a notice: each logging step."""
        every = args.logging_steps if args.logging_steps >= 1 else args.logging_steps * max(state.max_steps, 1)
        return max(1, int(every))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size > 1 and dist.is_initialized():
            self._when = (f"at the next logging step, where its {args.world_size} processes agree (every "
                          f"{self._agreement_steps(args, state)} steps, --logging_steps)")  # fmt: skip

    def _agreed(self, args: Any, state: Any) -> int | None:
        """The notice every process stops for now (a signal number), or None: at once for one
        process; for several, at each logging step, where any of them received one (the
        highest number, where they received different ones)."""
        if args.world_size <= 1 or not dist.is_initialized():
            return self.received
        if state.global_step % self._agreement_steps(args, state) and state.global_step != state.max_steps:
            return None
        flag = torch.tensor([self.received or 0], device=args.device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        notice = self._agreed(args, state)
        if notice is not None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.received = notice
        return control
