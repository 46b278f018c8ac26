"""How many worker processes a run starts, and how they start (refilled_hf.worker_processes)."""

from __future__ import annotations

import os
import pickle
import signal
import sys

import torch

import refilled_hf.worker_processes as workers


def test_loader_workers_default_to_the_cores_of_this_process_but_one_on_an_accelerator_only(monkeypatch):
    """On an accelerator the worker path's loading would otherwise run between its steps, in the
    training process, which keeps one core; on the CPU, workers would take the training's cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers.default_loader_workers(on_accelerator=True) == 8  # 15, at most MAX_LOADER_WORKERS
    assert workers.default_loader_workers(on_accelerator=False) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 GPUs' processes on this machine: 4 cores each
    assert workers.default_loader_workers(on_accelerator=True) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # 1 core each: still one worker, not none
    assert workers.default_loader_workers(on_accelerator=True) == 1
    monkeypatch.setattr(sys, "platform", "darwin")  # not forked: a worker would re-import the script
    assert workers.default_loader_workers(on_accelerator=True) == 0


class _Handlers(torch.utils.data.Dataset):
    """Each item: whether the worker that reads it ignores a Ctrl-C, SIGTERM and SIGUSR1."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple:
        return tuple(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))


def test_loader_workers_leave_the_run_s_signals_to_it_then_run_the_loader_s_own_init(tmp_path):
    """A Ctrl-C, SIGTERM or SIGUSR1 sent to every process of a job is the training process's to
    handle; the init given (transformers' seeding, a user's) still runs, also in spawned workers."""
    marks = tmp_path / "marks"
    init = workers.loader_worker_init(_Mark(str(marks)))
    pickle.dumps(init)  # (a spawned worker receives it pickled)
    loader = torch.utils.data.DataLoader(_Handlers(), batch_size=None, num_workers=2, worker_init_fn=init,
                                         multiprocessing_context="fork")  # fmt: skip
    assert [tuple(item) for item in loader] == [(True, True, True)] * 2
    assert sorted(marks.read_text().split()) == ["0", "1"]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # (this process's own are unchanged)


class _Mark:
    def __init__(self, path: str):
        self.path = path

    def __call__(self, worker_id: int) -> None:
        with open(self.path, "a") as out:
            out.write(f"{worker_id}\n")
