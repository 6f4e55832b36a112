"""Runs of one model's lineage in RUNS_DIR: which run an update starts from,
what the new one is called, and what it records (update.json).

An update run is ``RUNS_DIR/NNNN-full`` or ``NNNN-incremental``; it becomes a
parent only once it was published (``published.json``). A run trained by
``python -m trainer`` into RUNS_DIR (no update.json) is an initial parent.
Runs whose gate refused them (``*.rejected``) or whose export failed are
never parents, so a refused or broken update never poisons the next one.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from trainer.saving import MODEL_STATE

UPDATE_FILE = "update.json"
PUBLISHED_FILE = "published.json"
_NAME = re.compile(r"^(\d{4,})-(full|incremental)$")


class LineageError(ValueError):
    """No run to update from; the message names RUNS_DIR."""


def _sequence(run: Path) -> int:
    m = _NAME.match(run.name)
    return int(m.group(1)) if m else 0


def _is_parent(run: Path) -> bool:
    if not ((run / "config.yaml").is_file() and (run / MODEL_STATE).is_dir()):
        return False
    if _NAME.match(run.name):
        return (run / PUBLISHED_FILE).is_file()
    return not (run / UPDATE_FILE).exists()


def latest_run(runs_dir: Path) -> Path:
    """The newest publishable parent: the highest-numbered published update run,
    else the newest initial training run."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise LineageError(f"--runs {runs_dir}: not a directory; train an initial run into "
                           f"it first (python -m trainer --output {runs_dir}/initial)")
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and _is_parent(p)]
    if not runs:
        raise LineageError(f"--runs {runs_dir}: holds no finished run with model state "
                           f"({MODEL_STATE}/) to update; train one first (python -m "
                           f"trainer --output {runs_dir}/initial)")
    return max(runs, key=lambda p: (_sequence(p), (p / "config.yaml").stat().st_mtime))


def next_run_dir(runs_dir: Path, kind: str) -> Path:
    """RUNS_DIR/NNNN-kind, numbered above every update run there (finished or not)."""
    names = [p.name.split(".")[0] for p in Path(runs_dir).iterdir()]
    highest = max([0] + [int(m.group(1)) for n in names if (m := _NAME.match(n))])
    return Path(runs_dir) / f"{highest + 1:04d}-{kind}"


def read_update(run: Path) -> Optional[dict]:
    path = Path(run) / UPDATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


@contextmanager
def update_lock(runs_dir: Path):
    """One update at a time per RUNS_DIR (an OS file lock: a killed update
    leaves none). Holding it, staging directories of update runs are leftovers
    of killed updates and are removed."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / ".update.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LineageError(f"another update of {runs_dir} is running") from None
        for stale in runs_dir.glob("*.staging"):
            if _NAME.match(stale.name.removesuffix(".staging")):
                shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
