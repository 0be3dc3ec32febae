"""The run folder of a training run, and whether a run starts or resumes (decided before anything is built).

Every output of a run lives under ``<output_root>/<name>/`` (:class:`RunDir`): ``options.json``,
``checkpoints/checkpoint-<step>/``, ``logs/`` (tensorboard), ``validation/`` and ``final/``. :func:`resolve_resume`
checks a ``--resume`` target, and refuses to overwrite a finished run, before any model is loaded;
:func:`write_run_options` records the resolved options of each start. :class:`TrainingError`, the package's error
for runs that cannot start or continue, lives here because every other module of the package builds on this one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import OptionsError, UserError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class TrainingError(UserError):
    """A run cannot start or continue: a bad --resume target, an occupied run folder, a mismatching checkpoint."""



@dataclass(frozen=True)
class RunDir:
    """The layout of one training run: every output of a run lives under ``root = <output_root>/<name>``."""

    root: Path

    @classmethod
    def of(cls, output_root: str | os.PathLike[str], name: str) -> RunDir:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise OptionsError(f"name {name!r}: expected a plain folder name (no slashes)")
        return cls(Path(output_root) / name)

    @property
    def options(self) -> Path:
        """The resolved options of the run (rewritten on resume)."""
        return self.root / "options.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """Tracker output (tensorboard event files)."""
        return self.root / "logs"

    @property
    def validation(self) -> Path:
        """One ``step-<n>.json`` (and possibly images) per validation."""
        return self.root / "validation"

    @property
    def final(self) -> Path:
        """The trained weights at the end (the stage's ``save_pretrained`` folder)."""
        return self.root / "final"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-<step>`` folders with a training state) as (step, path), oldest first.

    Interrupted saves (``.tmp`` folders) and foreign folders are ignored.
    """
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(run: RunDir, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from, checked before anything is built or written.

    ``None``: a new run, refused when the run folder already holds checkpoints or final weights (so a typo in a name
    cannot silently overwrite a finished run). ``"latest"``: the newest checkpoint of this run that loads completely
    (a damaged newer one is skipped with a warning that says why; none loading is an error), or a new run when there
    is none yet (so one command line serves for the first start and for every restart of a preempted job). Anything
    else: the path of a checkpoint folder, possibly of another run, refused in one line when it does not load.
    """
    if resume is None:
        existing = list_checkpoints(run.checkpoints)
        if existing or (run.final.is_dir() and any(run.final.iterdir())):
            what = f"checkpoints (last step {existing[-1][0]})" if existing else "final weights"
            raise TrainingError(
                f"run folder {run.root} already holds {what}: pass --resume latest to continue it, "
                f"or choose another run name (--set name=...)"
            )
        return None
    from utils.training.checkpoints import checkpoint_problem  # that module builds on this one

    if resume == "latest":
        existing = list_checkpoints(run.checkpoints)
        skipped = []
        for _, path in reversed(existing):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("--resume latest: skipping %s: %s", path, problem)
            skipped.append(f"{path.name}: {problem}")
        if skipped:
            raise TrainingError(
                f"--resume latest: no checkpoint in {run.checkpoints} loads completely ({'; '.join(skipped)}); "
                f"move the folder away to start the run over"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise TrainingError(f"--resume {resume}: no such checkpoint folder")
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"--resume {resume}: not a complete checkpoint ({STATE_FILE} is missing)")
    problem = checkpoint_problem(path)
    if problem:
        raise TrainingError(f"--resume {resume}: checkpoint cannot be loaded: {problem}")
    return path


def write_run_options(accelerator: Any, options: Any, run: RunDir) -> None:
    """Write the resolved options to ``run.options`` (main process); on resume, log the keys that changed."""
    from utils.options import options_to_dict, save_options

    if accelerator.is_main_process:
        if run.options.is_file():
            try:
                before = _flatten(json.loads(run.options.read_text(encoding="utf-8")))
            except (OSError, ValueError, RecursionError, AttributeError):  # unreadable: nothing to compare with
                before = {}
            after = _flatten(options_to_dict(options))
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            if before and changed:
                log.warning("options changed since the last start of this run: %s", ", ".join(changed))
        save_options(options, run.options)
    accelerator.wait_for_everyone()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
