"""``assets.extra/metadata.json``: what a version is, where it came from, how good."""
from __future__ import annotations

import json
import time
from pathlib import Path

METADATA_FILE = "metadata.json"


def write_metadata(version_dir: Path, metadata: dict) -> Path:
    extra = version_dir / "assets.extra"
    extra.mkdir(parents=True, exist_ok=True)
    path = extra / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, default=str), encoding="utf-8")
    return path


def read_metadata(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / "assets.extra" / METADATA_FILE).read_text())


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
