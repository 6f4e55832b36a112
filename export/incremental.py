"""Incremental export: the next version from the previous one, its ScaNN index
refreshed instead of rebuilt (issue 14).

    previous version (retrieval's ScaNN state + catalog fingerprints, candidate_tower)
    + new run
      ─▶ change_detection: which items can have moved (towers and catalog rows compared)
      ─▶ embed only those; a probe re-embeds a sample of the others (must be bit-identical)
      ─▶ index_refresh: delete / upsert them in the previous index (tree, codebooks kept)
      ─▶ all models staged, checked (session loader, recall@k vs exact on held-out
         users, C++ loader with --native-check) and published as one version, exactly
         as a full export (export.exporter), retrieval_exact over the refreshed rows

It falls back to a full export (every item embedded, ScaNN re-trained and
re-tuned) when the towers differ in more than the item id embeddings, when more
than ``max_changed_fraction`` of the catalog changed, when the leaves got
unbalanced (ScaNN's weighted relative imbalance grew by more than
``max_imbalance_increase`` since the last full build), or when the refreshed index
misses the recall target. The version's metadata says which, under "update".
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import tensorflow as tf

from export.change_detection import (FINGERPRINT_FORMAT, FullBuildNeeded,
                                     catalog_fingerprints, compare_towers,
                                     plan_update, read_fingerprints, read_tower_state,
                                     tower_state)
from export.exporter import (ExportOptions, ExportResult, PrebuiltScann, RecallTooLowError,
                             _context, _export)
from export.index_refresh import (IMBALANCE_STAT, IndexStateError, read_index_state, refresh,
                                  saved_arrays, scann_layer_from_state)
from export.ground_truth import TruthMismatch, read_lists, updated_lists
from export.metadata import read_metadata
from export.run_artifacts import TrainedRun, feature_columns, load_run, read_items
from export.scann_tuning import ScannParams
from export.verify import INCREMENTAL_CHECKS
from export.versioning import VersionError, existing_versions, export_lock, is_complete


@dataclass
class IncrementalOptions:
    base_version: Union[str, int] = "auto"  # "auto": the newest complete retrieval version
    max_changed_fraction: float = 0.1   # (inserted + updated + deleted) / previous catalog
    max_imbalance_increase: float = 0.25  # of ScaNN's weighted relative leaf imbalance
    probe_items: int = 256              # unchanged items re-embedded as a check
    # A tower on the same weights gives the same vector up to the last bit or so:
    # how a batch is split changes float rounding (1 ulp in ~0.1 % of rows).
    probe_atol: float = 1e-6


def export_incremental(run_dir: str | Path, model_base: str | Path,
                       options: ExportOptions = ExportOptions(),
                       incremental: IncrementalOptions = IncrementalOptions()) -> ExportResult:
    """Publish ``run_dir`` as the next version, refreshing the previous index when
    that is exact and cheap, else by a full export; the metadata's "update" says which."""
    model_base = Path(model_base)
    run = load_run(run_dir)
    settings = {"max_changed_fraction": incremental.max_changed_fraction,
                "max_imbalance_increase": incremental.max_imbalance_increase}
    with export_lock(model_base):
        base = _base_version(model_base, incremental.base_version)
        try:
            if base is None:
                raise FullBuildNeeded(f"no published retrieval version in {model_base}")
            return _refresh(run, model_base, base, options, incremental, settings)
        except (FullBuildNeeded, IndexStateError, RecallTooLowError) as why:
            reason = str(why)
        update = {"kind": "full", "requested": "incremental", "base_version": base,
                  "fallback_reason": reason, **settings}
        return _export(_context(run, options), model_base, options,
                       extra_metadata={"update": update})


def refresh_counts(update: dict) -> str:
    """'N re-embedded, N inserted, N updated, N deleted' of an incremental
    export's ``update`` metadata."""
    return ", ".join(f"{update[k]} {k.replace('_', '-')}"
                     for k in ("re_embedded", "inserted", "updated", "deleted"))


def _base_version(model_base: Path, requested) -> int | None:
    versions = [v for v in existing_versions(model_base / "retrieval")
                if is_complete(model_base / "retrieval" / str(v))]
    if requested == "auto":
        return versions[-1] if versions else None
    version = int(requested)
    if version not in versions:
        raise VersionError(f"--incremental-from {version}: {model_base / 'retrieval'} has no "
                           f"complete version {version} (has {versions or 'none'})")
    return version


def _refresh(run: TrainedRun, model_base: Path, base: int, options: ExportOptions,
             incremental: IncrementalOptions, settings: dict) -> ExportResult:
    seconds, clock = {}, time.perf_counter()
    detail = _Stopwatch()
    base_dir = model_base / "retrieval" / str(base)
    base_meta = read_metadata(base_dir)
    if base_meta.get("index", {}).get("type") != "scann":
        raise FullBuildNeeded(f"{base_dir} is not a ScaNN retrieval model")
    if (base_meta.get("k"), base_meta.get("max_exclude")) != (options.k, options.max_exclude):
        raise FullBuildNeeded(f"{base_dir} serves k={base_meta.get('k')}, max_exclude="
                              f"{base_meta.get('max_exclude')}; this export asks for "
                              f"k={options.k}, max_exclude={options.max_exclude}")
    state = read_index_state(base_dir)
    detail.lap("read_index")
    old_tower = read_tower_state(base_dir) or tower_state(
        tf.saved_model.load(str(_base_tower(model_base, base, base_meta))))
    id_changes = compare_towers(old_tower, tower_state(run.candidate_tower),
                                run.spec.get("item_id_feature", "item_id"))
    detail.lap("compare_towers")
    items = read_items(options.items_path, run)
    fingerprints = catalog_fingerprints(items, run.spec["candidate"])
    previous, fmt = read_fingerprints(base_dir)
    # stored in an older format: this catalog hashed that way too, for the comparison
    comparable = (fingerprints if fmt == FINGERPRINT_FORMAT
                  else catalog_fingerprints(items, run.spec["candidate"], fmt))
    plan = plan_update(state.item_ids, previous, comparable, id_changes)
    detail.lap("compare_catalog")
    seconds["detect"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()

    vectors = _embed(run, items, plan.reembed_rows)
    _probe(run, items, plan, state, incremental)
    rows = plan.reembed_index_rows
    known = rows >= 0
    moved = ~known | (vectors != state.vectors[np.maximum(rows, 0)]).any(axis=1)
    counts = {"previous_items": len(state.item_ids), "re_embedded": len(plan.reembed),
              "inserted": int((~known).sum()), "updated": int((known & moved).sum()),
              "deleted": len(plan.deleted), "unchanged": len(plan.unchanged)}
    changed = (counts["inserted"] + counts["updated"] + counts["deleted"]) / max(
        1, len(state.item_ids))
    if changed > incremental.max_changed_fraction:
        raise FullBuildNeeded(f"{changed:.1%} of the catalog changed, above "
                              f"max_changed_fraction {incremental.max_changed_fraction:.1%}")
    seconds["embed"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()

    detail.lap("embed")
    refreshed = refresh(state, plan.deleted, plan.reembed[moved], vectors[moved])
    detail.lap("scann_upsert_delete")
    previous_update = base_meta.get("update", {})
    baseline = (previous_update["baseline_imbalance"]
                if previous_update.get("kind") == "incremental"
                else refreshed.health_before[IMBALANCE_STAT])
    imbalance = refreshed.health_after[IMBALANCE_STAT]
    if imbalance - baseline > incremental.max_imbalance_increase:
        raise FullBuildNeeded(f"ScaNN's leaves became unbalanced: weighted relative imbalance "
                              f"{imbalance:.3f}, {baseline:.3f} at the last full build "
                              f"(max increase {incremental.max_imbalance_increase})")
    params = ScannParams(**base_meta["index"]["params"])
    k = min(options.k, len(refreshed.state.item_ids))
    layer = scann_layer_from_state(refreshed.state, k, params)
    detail.lap("scann_layer")
    seconds["index"] = round(time.perf_counter() - clock, 2)
    seconds["steps"] = detail.laps

    ctx = _context(run, options, items=items, fingerprints=fingerprints,
                   catalog=(refreshed.state.item_ids, refreshed.state.vectors))
    ctx.reuse_towers = {name: model_base / name / str(base)
                        for name in ("query_tower", "candidate_tower")}
    ctx.exact_lists, truth = _carried_truth(base_dir, ctx, plan,
                                            min(options.k, len(ctx.catalog_ids)))
    detail.lap("context")
    update = {"kind": "incremental", "base_version": base,
              "changed_fraction": round(changed, 6), **settings, **counts,
              "reasons": plan.reasons, "baseline_imbalance": baseline,
              "scann_health": {"before": refreshed.health_before,
                               "after": refreshed.health_after},
              "ground_truth": truth, "incremental_options": asdict(incremental),
              "seconds": seconds}
    return _export(ctx, model_base, options,
                   PrebuiltScann(layer, params, saved_arrays(refreshed.state)),
                   {"update": update}, INCREMENTAL_CHECKS)


def _carried_truth(base_dir: Path, ctx, plan, k: int):
    """The check queries' exact lists, updated from the previous version's when
    it has them for the same query vectors (export.ground_truth), and how."""
    previous = read_lists(base_dir)
    if previous is None:
        return None, "brute force (the previous version stores no exact lists)"
    try:
        lists = updated_lists(previous, ctx.query_emb, ctx.catalog_ids, ctx.catalog_emb,
                              np.concatenate([plan.reembed, plan.deleted]), k,
                              row_of=ctx.row_of)
    except TruthMismatch as err:
        return None, f"brute force ({err})"
    if lists is None:
        return None, "brute force (other query vectors than the previous version's)"
    return lists, f"carried from version {base_dir.name}, re-embedded rows scored"


class _Stopwatch:
    """Named laps, in seconds: where the detect/embed/index time went."""

    def __init__(self):
        self.laps, self._last = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _base_tower(model_base: Path, base: int, base_meta: dict) -> Path:
    """The candidate tower the previous version was built with: its published
    candidate_tower, else its run's tower."""
    for path in (model_base / "candidate_tower" / str(base),
                 Path(base_meta.get("run_dir", "")) / "towers" / "candidate"):
        if (path / "saved_model.pb").is_file():
            return path
    raise FullBuildNeeded(f"version {base}'s candidate tower is neither published in "
                          f"{model_base / 'candidate_tower'} nor in its run directory")


def _embed(run: TrainedRun, items, rows: np.ndarray) -> np.ndarray:
    """Candidate vectors [len(rows), d] of these catalog rows."""
    if not len(rows):
        return np.zeros((0, run.embedding_dim), np.float32)
    subset = items.iloc[rows]
    return run.embed("candidate", feature_columns(subset, run.spec["candidate"], "item table"))


def _probe(run, items, plan, state, incremental: IncrementalOptions) -> None:
    """Items judged unchanged must embed to their published vectors (to rounding)."""
    n = min(incremental.probe_items, len(plan.unchanged))
    if n <= 0:
        return
    pick = np.random.default_rng(0).choice(len(plan.unchanged), n, replace=False)
    got = _embed(run, items, plan.unchanged_rows[pick])
    want = state.vectors[plan.unchanged_index_rows[pick]]
    sample = plan.unchanged[pick]
    differs = (np.abs(got - want) > incremental.probe_atol).any(axis=1)
    if differs.any():
        item = sample[int(np.flatnonzero(differs)[0])]
        raise FullBuildNeeded(
            f"item {item!r} embeds differently although neither its id embedding nor its "
            f"catalog row changed ({int(differs.sum())} of {len(sample)} probed items; max abs "
            f"diff {np.abs(got - want).max():.2e}): the towers differ in something the "
            "variable comparison cannot see")
