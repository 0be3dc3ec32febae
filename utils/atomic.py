"""Writing files and folders so that readers see them complete or not at all (never half written)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utils.errors import UserError

TMP_SUFFIX = ".tmp"


class OutputPathError(UserError):
    """An output path that would leave its output folder (a symlinked folder, ``..``) or cannot be a folder."""


def make_parents_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """Create ``path``'s parent folders below ``root``, refusing any route out of ``root``.

    ``path`` must lie under ``root`` by name (no absolute or ``..`` part after ``root``), and no folder between
    ``root`` and ``path`` may be a symbolic link: a symlinked folder in an output tree would send the file
    elsewhere. ``root`` itself is the user's choice and is trusted (it may be a link); a link at ``path`` itself
    is harmless (the rename replaces the link, not its target).
    Raises :class:`OutputPathError` naming the offending component.
    """
    path, root = Path(path), Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise OutputPathError(f"{path}: not inside the output folder {root}") from None
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise OutputPathError(f"{path}: refused: its name leaves the output folder {root} ('..' or '.')")
    if root.exists() and not root.is_dir():
        raise OutputPathError(f"{root}: output folder is an existing file")
    root.mkdir(parents=True, exist_ok=True)
    current = root
    for i, part in enumerate(parts):
        current = current / part
        if i < len(parts) - 1:
            if current.is_symlink():
                raise OutputPathError(
                    f"{current}: refused: a symbolic link; outputs are written only inside {root}, never through "
                    "linked folders"
                )
            if not current.exists():
                current.mkdir()
            elif not current.is_dir():
                raise OutputPathError(f"{current}: refused: expected a folder, found a file")
    return path


def write_atomic(path: str | os.PathLike[str], data: bytes, root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place (same filesystem).

    With ``root``, ``path`` must stay inside that folder: see :func:`make_parents_inside`.
    """
    path = Path(path)
    if root is not None:
        make_parents_inside(path, root)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes the file private; use the usual mode
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_directory(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Move the finished folder ``src`` to ``dest``, replacing it; ``dest`` is never seen half written."""
    src, dest = Path(src), Path(dest)
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, on failure it is removed."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, dest)
