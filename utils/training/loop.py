"""The training loop: optimizer steps under gradient accumulation, with logging, validation, checkpoints and stops.

A stage script's training step only does forward, ``accelerator.backward`` and
:func:`~utils.training.optim.optimizer_step`; :func:`run_training_loop` wraps it in ``accelerator.accumulate``,
counts optimizer steps, logs (to the trackers and to a JSON-lines metrics file, see :func:`read_metrics`), validates,
checkpoints and stops: at ``max_steps``, at ``--stop-at``, or on Ctrl-C / SIGTERM (:class:`GracefulInterrupt`: the
current step finishes and a checkpoint is saved; a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.training.batches import ResumableBatches
from utils.training.checkpoints import CheckpointManager, TrainState


class GracefulInterrupt:
    """Within the ``with`` block the first SIGINT (Ctrl-C) or SIGTERM (batch schedulers) only sets ``requested``.

    The training loop checks the flag between optimizer steps, saves a checkpoint and stops; a second Ctrl-C raises
    ``KeyboardInterrupt`` at once (no checkpoint). Outside the main thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


StepFn = Callable[[Any, TrainState], Mapping[str, Any]]
ValidateFn = Callable[[int], Mapping[str, float] | None]


@dataclass
class LoopResult:
    """How :func:`run_training_loop` ended: ``finished`` (max_steps), ``stopped`` (stop_at) or ``interrupted``."""

    state: TrainState
    status: str
    checkpoint: Path | None


class _LogWindow:
    """Means of the step function's values since the last log line, reduced over processes at log time only."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if value is None:
                continue
            v = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[key] = self.sums[key] + v if key in self.sums else v
            self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, accelerator: Any) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k].to(accelerator.device) / self.counts[k] for k in keys])
        if accelerator.num_processes > 1:
            means = accelerator.reduce(means, reduction="mean")
        self.sums.clear()
        self.counts.clear()
        return dict(zip(keys, means.tolist()))


class _MetricsFile:
    """Logged values as JSON lines ``{"step": n, ...}``; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: str | os.PathLike[str], resume_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a ``metrics_file`` as dicts, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_training_loop(
    accelerator: Any,
    *,
    batches: ResumableBatches,
    models: Iterable[nn.Module],
    step_fn: StepFn,
    train: Any,
    checkpoints: CheckpointManager,
    validate: ValidateFn | None = None,
    stop_at: int | None = None,
    description: str = "training",
    metrics_file: str | os.PathLike[str] | None = None,
) -> LoopResult:
    """Run optimizer steps from ``batches.state.step`` to ``train.max_steps`` (a TrainLoopOptions).

    ``step_fn(batch, state)`` does one micro-batch: forward, ``accelerator.backward``, :func:`optimizer_step`; it
    returns values to log (tensors or numbers, averaged over the micro-batches and steps of each log interval).
    The loop wraps it in ``accelerator.accumulate(*models)`` and, after each optimizer step: logs every
    ``train.log_every`` steps, validates every ``train.validate_every`` steps and at the end (``validate(step)`` runs
    on every process; the metrics it returns on the main process are logged), checkpoints every
    ``train.checkpoint_every`` steps and at the end. ``stop_at`` (a step) or a first Ctrl-C / SIGTERM stops early,
    after a checkpoint, with status ``stopped`` / ``interrupted``. ``metrics_file``: every logged dict is also
    appended there as a JSON line (readable without a tracker; lines after a resumed step are dropped first).
    """
    from tqdm.auto import tqdm

    state = batches.state
    models = list(models)
    max_steps = train.max_steps
    window = _LogWindow()
    metrics = _MetricsFile(metrics_file, state.step) if metrics_file and accelerator.is_main_process else None
    last_checkpoint: Path | None = None
    status = "finished"
    progress = tqdm(
        total=max_steps,
        initial=min(state.step, max_steps),
        desc=description,
        unit="step",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )

    def checkpoint() -> Path | None:
        if checkpoints.last_saved_step == state.step:
            return checkpoints.last_saved
        return checkpoints.save(state)

    with GracefulInterrupt() as interrupt:
        batch_iter = iter(batches)
        while state.step < max_steps and (stop_at is None or state.step < stop_at):
            batch = next(batch_iter)
            with accelerator.accumulate(*models):
                values = step_fn(batch, state)
            window.add(values)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            step = state.step
            if step % train.log_every == 0 or step == max_steps:
                means = window.reduce(accelerator)
                accelerator.log(means, step=step)
                if metrics is not None:
                    metrics.write(step, means)
                progress.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
            if validate is not None and (step % train.validate_every == 0 or step == max_steps):
                scores = validate(step)
                if scores:
                    accelerator.log(dict(scores), step=step)
                    if metrics is not None:
                        metrics.write(step, scores)
                accelerator.wait_for_everyone()
            if step % train.checkpoint_every == 0:
                last_checkpoint = checkpoint()
            if _any_process(accelerator, interrupt.requested):
                status = "interrupted"
                break
        if status == "finished" and state.step < max_steps:
            status = "stopped"
        if state.step > 0:
            last_checkpoint = checkpoint()  # the end, a stop or an interruption: always resumable from here
    progress.close()
    return LoopResult(state=state, status=status, checkpoint=last_checkpoint)


def _any_process(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is set on any process (all processes must stop at the same step to save together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
