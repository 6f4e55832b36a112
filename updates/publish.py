"""Publish a run as the next served version, repair a cut publish, prune.

``publish_run`` is the one place an update calls export. With
``refresh_index`` (incremental updates) it refreshes the served version's
ScaNN index (export.incremental: only the items whose vectors can have
moved are re-embedded and upserted, the partitioning and codebooks are
kept), and export falls back to a full build, reported in the metadata,
when too much changed or the refreshed index misses the recall target.
Export stages and checks every model and renames them into place one by
one; a kill between those renames would leave the version in some models
only. So the version number is chosen here and written to an intent file
(``MODEL_BASE/.update-publish.json``, not an integer: servers ignore it)
before the export, and removed after it. The next update finds a left-over
intent and removes that version from the models that have it (a watching
server then goes back to the previous version, which is still on disk:
pruning never removes the version below the newest).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from export.exporter import ALL_MODELS, ExportOptions, ExportResult, export_run
from export.incremental import IncrementalOptions, export_incremental, refresh_counts
from export.scann_tuning import ScannParams
from export.versioning import existing_versions, export_lock, is_complete, next_version

INTENT_FILE = ".update-publish.json"
SKIPPED_FILE = ".update-skipped.json"   # a removed half-published version: never reused


@dataclass(frozen=True)
class PublishOptions:
    k: int = 100
    recall_target: float = 0.95
    native_check: bool = False
    progress: bool = True
    keep: Optional[int] = None        # versions to keep per model (None: all)
    serving_num_versions: int = 1     # what a server's latest { num_versions } may serve
    scann_params: Optional[ScannParams] = None   # fixed index settings: skip tuning
    refresh_index: bool = False       # refresh the served ScaNN index instead of rebuilding
    max_changed_fraction: float = 0.1  # of the catalog; above it the refresh rebuilds


def repair_cut_publish(model_base: Path) -> Optional[int]:
    """Remove the version a killed publish left in only some models; returns it."""
    intent = Path(model_base) / INTENT_FILE
    if not intent.is_file():
        return None
    version = int(json.loads(intent.read_text())["version"])
    with export_lock(Path(model_base)):
        dirs = [Path(model_base) / m / str(version) for m in ALL_MODELS]
        if all(is_complete(d) for d in dirs) or not any(d.exists() for d in dirs):
            removed = None          # the publish finished, or never began renaming
        else:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            removed = version
            # the number stays taken: a server may have loaded it from one model
            (Path(model_base) / SKIPPED_FILE).write_text(json.dumps({"version": version}))
        intent.unlink()
    return removed


def publish_run(run_dir: Path, model_base: Path, options: PublishOptions) -> ExportResult:
    """Export all four models of ``run_dir`` as the next version (checked, atomic)."""
    model_base = Path(model_base)
    model_base.mkdir(parents=True, exist_ok=True)
    version = next_version(model_base, list(ALL_MODELS))
    skipped = model_base / SKIPPED_FILE
    if skipped.is_file():
        version = max(version, int(json.loads(skipped.read_text())["version"]) + 1)
    intent = model_base / INTENT_FILE
    intent.write_text(json.dumps({"version": version, "run": str(run_dir)}))
    export_options = ExportOptions(
        k=options.k, recall_target=options.recall_target, version=version,
        native_check=options.native_check, progress=options.progress,
        scann_params=options.scann_params)
    if options.refresh_index:
        result = export_incremental(run_dir, model_base, export_options, IncrementalOptions(
            "auto", max_changed_fraction=options.max_changed_fraction))
    else:
        result = export_run(run_dir, model_base, export_options)
    intent.unlink()
    return result


def describe_index(result: ExportResult) -> str:
    """How the published retrieval index was made, from its metadata."""
    update = result.metadata.get("retrieval", {}).get("update")
    if not update:
        return "index built and tuned from scratch"
    if update["kind"] == "incremental":
        return f"index refreshed from version {update['base_version']}: {refresh_counts(update)}"
    return f"index rebuilt instead of refreshed: {update['fallback_reason']}"


def prune(model_base: Path, keep: int, serving_num_versions: int = 1) -> list[Path]:
    """Remove all but the newest ``keep`` complete versions of each model.

    Never keeps fewer than ``serving_num_versions`` + 1: the versions a
    server's ``latest { num_versions: N }`` serves, plus the one it falls
    back to while a new version loads or fails.
    """
    floor = serving_num_versions + 1
    if keep < floor:
        raise ValueError(f"--keep {keep}: a server serving the latest "
                         f"{serving_num_versions} version(s) needs at least {floor} on disk")
    removed = []
    with export_lock(Path(model_base)):
        for model in ALL_MODELS:
            model_dir = Path(model_base) / model
            complete = [v for v in existing_versions(model_dir)
                        if is_complete(model_dir / str(v))]
            for v in complete[:-keep]:
                shutil.rmtree(model_dir / str(v))
                removed.append(model_dir / str(v))
    return removed


def serving_num_versions(model_config_file: Optional[Path]) -> int:
    """The largest ``latest { num_versions }`` in a TF Serving model config file
    (1 when none is given or a model has no latest policy)."""
    if model_config_file is None:
        return 1
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(Path(model_config_file).read_text(),
                               model_server_config_pb2.ModelServerConfig())
    counts = [c.model_version_policy.latest.num_versions
              for c in config.model_config_list.config
              if c.model_version_policy.WhichOneof("policy_choice") == "latest"]
    return max([1] + counts)
