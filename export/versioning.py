"""TF Serving's layout ``base/<model>/<version>/`` with atomic, increasing versions.

A version is built in a hidden staging directory beside its target (same
file system, a name TF Serving ignores because it is not an integer) and
renamed into place only after every check passed, so a watcher never sees half
a version and a failed export leaves nothing behind. Existing version
directories, complete or broken, are never overwritten.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional


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
            staging = model_dir / f".staging-{self.version}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            self._dirs[model_name] = staging
        return self._dirs[model_name]

    def target(self, model_name: str) -> Path:
        return self.model_base / model_name / str(self.version)

    def publish(self) -> dict[str, Path]:
        """Rename every staged directory into place (each rename is atomic)."""
        published = {}
        for name, staging in list(self._dirs.items()):
            _fsync_tree(staging)
            os.rename(staging, self.target(name))
            published[name] = self.target(name)
            del self._dirs[name]
        return published

    def __enter__(self) -> "StagedVersion":
        return self

    def __exit__(self, *exc) -> None:
        for staging in self._dirs.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._dirs.clear()


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
