"""Publish an unchanged tower by hard-linking the previous version's files.

A published ``query_tower`` / ``candidate_tower`` version is a function of the
run's tower SavedModel (``towers/<side>/``: saved_model.pb, variables, assets),
the feature spec its signature is built from, the TensorFlow version and the
wrapper that ``export.serving_models.tower_module`` saves around it. Their
SHA-256 (``source_digest``) is recorded in every tower version's metadata; an
incremental export whose tower has the base version's digest hard-links that
version's saved_model.pb, fingerprint.pb, variables/ and assets/ into its
staging directory instead of saving the tower again (the model base is one
file system). ``assets.extra/`` (warmup requests, metadata) is written fresh,
so no file the new version writes is shared with the old one, and the session
check runs on the linked files as on saved ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import tensorflow as tf

from export.metadata import read_metadata

# Bump when tower_module (or how an export saves a tower) changes what is saved:
# a version saved by other code must not be linked as if it were this code's.
TOWER_FORMAT = 1
_LINKED = ("saved_model.pb", "fingerprint.pb", "variables", "assets")


def source_digest(tower_dir: Path, features: list[dict]) -> str:
    """SHA-256 over what a published tower is made from: every file under the
    run's tower SavedModel (relative path and bytes), its input features, the
    TensorFlow version and TOWER_FORMAT."""
    h = hashlib.sha256(json.dumps({"format": TOWER_FORMAT, "tensorflow": tf.__version__,
                                   "features": features}, sort_keys=True).encode())
    root = Path(tower_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel)
        h.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def reusable_version(previous: Path, digest: str) -> Optional[Path]:
    """``previous`` (a published tower version) when its metadata records
    ``digest`` and its SavedModel files are there; else None."""
    try:
        recorded = read_metadata(previous).get("source_digest")
    except (OSError, ValueError):
        return None
    if recorded != digest or not (previous / "saved_model.pb").is_file() \
            or not (previous / "variables").is_dir():
        return None
    return previous


def link_tower(previous: Path, out: Path) -> None:
    """Hard-link ``previous``'s SavedModel files (not assets.extra) into the empty
    staging directory ``out``. On OSError (another file system, no hard links)
    ``out`` is left empty again, for a normal save, and the error raised."""
    try:
        for name in _LINKED:
            src = previous / name
            if src.is_dir():
                shutil.copytree(src, out / name, copy_function=os.link)
            elif src.is_file():
                os.link(src, out / name)
    except OSError:  # shutil.Error is one
        for name in _LINKED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        raise
