"""TF Serving's layout ``base/<model>/<version>/`` with atomic, increasing versions.

A version is built in a hidden staging directory beside its target (same
file system, a name TF Serving ignores because it is not an integer) and
renamed into place only after every check passed, so a watcher never sees half
a version and a failed export leaves nothing behind. Existing version
directories, complete or broken, are never overwritten.

All models of one export are published or none, even if the export is killed
(SIGKILL, a crash, power loss) between its per-model renames: before the first
rename a publish journal (``base/.publish-journal.json``: the version and each
model's staging directory) is written and fsynced, and it is removed only
after the last rename is durable. Whoever takes the export lock next (the next
export) finds the journal and finishes that publish first: every staged
directory still there is renamed into place (roll forward: the killed export
had passed every check); if one is gone, the renamed ones are taken back
(roll back). Until then a watcher can see the models on different versions.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


LOCK_FILE = ".export.lock"   # not an integer: TF Serving ignores it
JOURNAL_FILE = ".publish-journal.json"
STAGING_PREFIX = ".staging-"

log = logging.getLogger(__name__)


class VersionError(ValueError):
    """A version that cannot be published (exists already, not increasing...)."""


def existing_versions(model_dir: Path) -> list[int]:
    """Integer-named children of a model directory (complete or not), sorted."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.name.isdigit() and p.is_dir())


def is_complete(version_dir: Path) -> bool:
    return (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()


def next_version(model_base: Path, model_names: list[str],
                 requested: Optional[int] = None) -> int:
    """One version number for all models of an export: above every existing one."""
    highest = max([0] + [v for m in model_names for v in existing_versions(model_base / m)])
    if requested is None:
        return highest + 1
    if requested <= 0:
        raise VersionError(f"--version must be a positive integer, got {requested}")
    for m in model_names:
        if (model_base / m / str(requested)).exists():
            raise VersionError(f"{model_base / m / str(requested)} already exists; versions "
                               "are never overwritten (omit --version for the next free one)")
    return requested


class StagedVersion:
    """Stage one version of several models; publish all of them or none.

    ``with StagedVersion(base, names, v) as stage:`` -> write into
    ``stage.dir(name)``; call ``stage.publish()`` once every check passed.
    Leaving the block without publishing (an exception) removes the staging
    directories and touches no existing version.
    """

    def __init__(self, model_base: Path, model_names: list[str], version: int):
        self.model_base, self.version = Path(model_base), version
        self._dirs: dict[str, Path] = {}
        for name in model_names:
            target = self.model_base / name / str(version)
            if target.exists():
                raise VersionError(f"{target} already exists; versions are never overwritten")

    def dir(self, model_name: str) -> Path:
        if model_name not in self._dirs:
            model_dir = self.model_base / model_name
            model_dir.mkdir(parents=True, exist_ok=True)
            staging = model_dir / f"{STAGING_PREFIX}{self.version}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            self._dirs[model_name] = staging
        return self._dirs[model_name]

    def target(self, model_name: str) -> Path:
        return self.model_base / model_name / str(self.version)

    def publish(self) -> dict[str, Path]:
        """Rename every staged directory into place: all of them or none.

        Each rename is atomic; every target is checked again just before, a
        rename that fails takes the earlier ones back, and the journal written
        first lets the next export finish a publish this process did not.
        """
        for staging in self._dirs.values():
            _fsync_tree(staging)
        for name in self._dirs:
            if self.target(name).exists():   # os.rename would replace an empty one
                raise VersionError(f"{self.target(name)} appeared while this export was "
                                   "staged; nothing published")
        if (self.model_base / JOURNAL_FILE).exists():
            raise VersionError(f"{self.model_base / JOURNAL_FILE}: an unfinished publish; "
                               "publish under export_lock(), which finishes it first")
        _write_journal(self.model_base, self.version,
                       {name: staging.name for name, staging in self._dirs.items()})
        published = {}
        try:
            for name, staging in self._dirs.items():
                os.rename(staging, self.target(name))
                published[name] = staging
        except OSError as err:
            failed = self.target(name)
            for done, staging in published.items():
                os.rename(self.target(done), staging)   # __exit__ removes them
            _remove_journal(self.model_base)
            raise VersionError(f"publishing {failed} failed ({err}); nothing published") \
                from err
        for name in published:
            _fsync_dir(self.target(name).parent)
        _remove_journal(self.model_base)
        self._dirs.clear()
        return {name: self.target(name) for name in published}

    def __enter__(self) -> "StagedVersion":
        return self

    def __exit__(self, *exc) -> None:
        for staging in self._dirs.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._dirs.clear()


@contextmanager
def export_lock(model_base: Path):
    """Held for a whole export: two exports into one model base would pick the
    same version number.  An OS file lock, so a killed export leaves none."""
    model_base.mkdir(parents=True, exist_ok=True)
    path = model_base / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise VersionError(f"another export into {model_base} is running "
                               f"({f.read().strip() or 'see ' + str(path)})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        # holding the lock, a journal or a staging directory is a killed
        # export's leftover: finish its publish, then drop what is left
        finish_interrupted_publish(model_base)
        for stale in model_base.glob(f"*/{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finish_interrupted_publish(model_base: Path) -> Optional[str]:
    """Roll a publish that a killed export left half done forward or back.

    Call holding the export lock (``export_lock`` does). Returns what was
    done ("forward"/"back"), None when no journal was there.
    """
    model_base = Path(model_base)
    journal = model_base / JOURNAL_FILE
    for partial in model_base.glob(f"{JOURNAL_FILE}.tmp-*"):  # killed before any rename
        partial.unlink()
    if not journal.exists():
        return None
    try:
        entry = json.loads(journal.read_text(encoding="utf-8"))
        version = int(entry["version"])
        moves = {name: (model_base / name / staging, model_base / name / str(version))
                 for name, staging in entry["models"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VersionError(f"{journal}: unreadable publish journal ({err}); check the "
                           "model directories by hand, then delete it") from None
    if all(target.is_dir() or staging.is_dir() for staging, target in moves.values()):
        action = "forward"
        for staging, target in moves.values():
            if not target.exists():
                os.rename(staging, target)
    else:   # a staged directory vanished: this version cannot be completed
        action = "back"
        for name, (staging, target) in moves.items():
            if target.is_dir():   # back to a staging name; the lock holder removes it
                os.rename(target, model_base / name / f"{STAGING_PREFIX}rolled-back-"
                          f"{version}-{uuid.uuid4().hex[:8]}")
    for name in moves:
        if (model_base / name).is_dir():
            _fsync_dir(model_base / name)
    _remove_journal(model_base)
    log.warning("%s: an export was interrupted while publishing version %d of %s; "
                "rolled %s", model_base, version, ", ".join(moves), action)
    return action


def _write_journal(model_base: Path, version: int, stagings: dict[str, str]) -> None:
    """Durably record the publish about to start (temp file, fsync, rename)."""
    tmp = model_base / f"{JOURNAL_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": version, "models": stagings}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_base / JOURNAL_FILE)
    _fsync_dir(model_base)


def _remove_journal(model_base: Path) -> None:
    (model_base / JOURNAL_FILE).unlink(missing_ok=True)
    _fsync_dir(model_base)


def _fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
