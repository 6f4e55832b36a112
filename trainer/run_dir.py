"""A run directory is written in a staging place and committed at the end.

``train(config, out)`` writes everything into ``<out>.staging`` (a sibling of
``out``, so the final rename stays on one file system) and only a training
that finished - fitted, evaluated, saved - is committed: the previous
``out`` (if any) is moved aside, the staging directory renamed to ``out``,
the old one deleted. A failed or interrupted training therefore never
replaces a good run; its staging directory keeps the Keras
``BackupAndRestore`` backup, and the same command run again resumes from it.
A crash between the two renames is repaired by the next ``open_staging``.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_COMPLETE = ".complete"   # written into staging just before the commit
RUN_MARKER = "config.yaml"   # every run directory has one, from its first second


def staging_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.staging"


def _replaced_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.replaced"


def _repair(out: Path) -> None:
    """Finish a commit that was cut short (or undo it if staging is not finished)."""
    staging, replaced = staging_dir(out), _replaced_dir(out)
    if (staging / _COMPLETE).exists():      # a finished training, not yet committed
        if out.exists() and not replaced.exists():
            os.rename(out, replaced)
        if not out.exists():
            os.rename(staging, out)
    elif replaced.exists() and not out.exists():
        os.rename(replaced, out)
    if replaced.exists():
        shutil.rmtree(replaced)
    (out / _COMPLETE).unlink(missing_ok=True)


def open_staging(out: Path, resumable: bool) -> Path:
    """The staging directory to train in: the interrupted one when it holds a
    backup to resume from (``resumable(staging)``), else a new empty one.

    Refuses an ``out`` that exists, is not empty and is not a run directory
    (committing would replace it).
    """
    out = Path(out)
    _repair(out)
    if out.exists() and any(out.iterdir()) and not (out / RUN_MARKER).is_file():
        raise ValueError(f"--output {out}: exists and is not a training run directory (no "
                         f"{RUN_MARKER}); refusing to replace it, choose another path")
    staging = staging_dir(out)
    if staging.exists() and not resumable(staging):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def commit(out: Path) -> None:
    """Replace ``out`` by its finished staging directory: ``out`` is moved aside,
    the staging directory renamed to ``out``, the old run deleted."""
    out = Path(out)
    (staging_dir(out) / _COMPLETE).touch()
    _repair(out)
    log.info("run committed to %s", out)
