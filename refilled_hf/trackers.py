"""Each stage of a run reports to a tracker run of its own, its final metrics included.

A run trains several stages in one process (stage 1, a stage 2 per lambda candidate, the
student alone), each with a Trainer of its own whose ``global_step`` starts from 0.
transformers' tracker callbacks do not keep such stages apart: W&B's starts a run where none
is active and leaves it open, so every later stage logged into stage 1's run, its steps from
0 again over stage 1's curves; MLflow's ends its run when training ends, before the stage's
validation and test are measured, so those metrics started a stray run (MLflow starts one
for a metric logged without), into which every later stage then logged.

Here a run a stage's callback started is kept open until the next stage trains (or the
refilled-hf run ends), then ended, and the next stage's callback starts its own (named after
the stage: see ``stage_args``). A run the user started before is never ended. This reaches
into the callbacks' state (``_wandb``, ``_ml_flow``, ``_auto_end_run``, ``_initialized``:
what they keep of their runs, and no public API exposes); where a release of transformers
names them otherwise, nothing here applies and its own behaviour remains.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

__all__ = ["KeepStageRunsOpen", "end_stage_runs"]

#: ("wandb" or "mlflow", run id) of the runs a stage's callback started
_STAGE_RUNS: set[tuple[str, str]] = set()


def _tracker_callbacks(callbacks: list[Any], kind: str) -> list[Any]:
    """transformers' ``kind`` ("wandb" or "mlflow") callbacks among ``callbacks``."""
    from transformers.integrations import MLflowCallback, WandbCallback

    return [c for c in callbacks if isinstance(c, WandbCallback if kind == "wandb" else MLflowCallback)]


def _active(kind: str, module: Any) -> str | None:
    """The id of ``module``'s active run (None where there is none, or it says no id)."""
    active_run = getattr(module, "active_run", None)
    run = getattr(module, "run", None) if kind == "wandb" else active_run() if callable(active_run) else None
    if run is None:
        return None
    return getattr(run, "id", None) if kind == "wandb" else getattr(getattr(run, "info", None), "run_id", None)


def _active_runs() -> dict[str, str | None]:
    """The id of the active W&B and MLflow run (None where there is none, or the library is
    not imported: no run can have been started)."""
    import sys

    return {kind: _active(kind, sys.modules[kind]) if kind in sys.modules else None for kind in ("wandb", "mlflow")}


def end_stage_runs(callbacks: list[Any] | None = None) -> None:
    """End the W&B and MLflow runs that an earlier stage started (runs the user started are
    left alone); ``callbacks``, a trainer's, are made to start a run of their own again."""
    import sys

    for kind, run_id in _active_runs().items():
        if run_id is not None and (kind, run_id) in _STAGE_RUNS:
            module = sys.modules[kind]
            module.finish() if kind == "wandb" else module.end_run()
            _STAGE_RUNS.discard((kind, run_id))
    for callback in _tracker_callbacks(callbacks or [], "wandb") + _tracker_callbacks(callbacks or [], "mlflow"):
        callback._initialized = False  # (one passed to several trainers) sets up a run at train begin


class KeepStageRunsOpen(TrainerCallback):
    """Placed after transformers' tracker callbacks, made just before the stage trains (or
    evaluates alone): once they have set up (at train begin, or at the first log of a
    trainer that only evaluates), it notes the runs they started (active now, not before)
    and keeps them open past the end of training, so that the stage's final metrics reach
    them (:func:`end_stage_runs` ends them)."""

    def __init__(self, handler: Any):
        self.handler = handler
        self.before = _active_runs()

    def _note_started(self) -> None:
        for kind, run_id in _active_runs().items():
            if run_id is None or run_id == self.before[kind] or (kind, run_id) in _STAGE_RUNS:
                continue  # none, the user's (as it is), or noted
            _STAGE_RUNS.add((kind, run_id))
            if kind == "mlflow":
                for callback in _tracker_callbacks(self.handler.callbacks, "mlflow"):
                    callback._auto_end_run = False  # not at train end: the stage's final metrics come after

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._note_started()

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._note_started()
