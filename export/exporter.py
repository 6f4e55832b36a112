"""Export a trained run as versioned SavedModels for TF Serving, checked.

    run dir ─▶ catalog embeddings (candidate tower) ─▶ ScaNN tuned to a recall
    target ─▶ query_tower, candidate_tower, retrieval (ScaNN), retrieval_exact
    (BruteForce) staged side by side ─▶ warmup + metadata ─▶ checks ─▶ publish

Nothing is published unless every check passes; all models of one export
share one version number.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scann  # noqa: F401  - registers the Scann>* ops for saving and session loading
import tensorflow as tf

from export.catalog import embed_catalog, id_index
from export.change_detection import (FullBuildNeeded, catalog_fingerprints, tower_state,
                                     write_fingerprints, write_tower_state)
from export.ground_truth import ExactLists, full_lists, write_lists
from export.metadata import now_iso, write_metadata
from export.run_artifacts import TrainedRun, feature_columns, load_run, read_items
from export.scann_tuning import ScannParams, TuningResult, escalate, tune
from export.serving_models import (SEEN_INPUT, RetrievalModule, brute_force_index,
                                   scann_index, tower_module)
from export.tower_reuse import link_tower, reusable_version, source_digest
from export.verify import (FULL_CHECKS, ExportCheckError, RetrievalChecks, SessionModel,
                           check_close, check_exact_retrieval, check_saved_arrays, recall,
                           run_with_session)
from export.versioning import StagedVersion, export_lock, next_version
from export.warmup import write_warmup_requests

_SCANN_ATTEMPTS = 3


class _RecallTooLow(Exception):
    """The built ScaNN index missed the recall target (retried with more search)."""


class RecallTooLowError(ExportCheckError):
    """The ScaNN index still missed the recall target after its last attempt."""


@dataclass
class PrebuiltScann:
    """A ScaNN index built elsewhere (export.incremental: the previous index,
    refreshed): a TFRS ScaNN layer over ``ctx.catalog_emb``'s rows, the
    parameters it was built and is searched with, and the arrays its saved
    variables must hold (object path -> array). Used once, never escalated."""
    layer: object
    params: ScannParams
    saved_arrays: dict = field(default_factory=dict)


ALL_MODELS = ("query_tower", "candidate_tower", "retrieval", "retrieval_exact")
SAVE_OPTIONS = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])


@dataclass
class ExportOptions:
    k: int = 100
    recall_target: float = 0.95
    max_exclude: int = 256
    sample_queries: int = 1000
    models: Sequence[str] = ALL_MODELS
    version: Optional[int] = None
    items_path: Optional[str] = None  # a new/changed catalog (refresh without retraining)
    scann_params: Optional[ScannParams] = None  # skip tuning
    native_check: bool = False  # also load each version with the C++ loader
    progress: bool = True


@dataclass
class ExportResult:
    version: int
    paths: dict[str, Path]
    metadata: dict[str, dict] = field(default_factory=dict)


@dataclass
class _Context:
    run: TrainedRun
    items: pd.DataFrame
    catalog_ids: np.ndarray
    catalog_emb: np.ndarray
    user_inputs: dict  # sample user features (the checks), the tower's input columns
    query_emb: np.ndarray  # in-memory query tower on user_inputs
    tune_emb: np.ndarray  # query embeddings of another user sample (ScaNN tuning)
    item_inputs: dict
    options: ExportOptions
    fingerprints: pd.Series  # catalog_fingerprints of ``items``, stored with `retrieval`
    seconds: dict = field(default_factory=dict)  # embed_catalog / tune wall times
    truth: dict = field(default_factory=dict)  # k -> exact top-k rows of query_emb (cached)
    exact_lists: Optional[ExactLists] = None  # query_emb's exact best items, kept with retrieval
    # tower model name -> the published version to hard-link when the run's tower is
    # provably the same (export.tower_reuse; an incremental export's base version)
    reuse_towers: dict = field(default_factory=dict)
    _row_of: Optional[pd.Index] = None

    @property
    def row_of(self) -> pd.Index:
        """The catalog's ids (str) as an Index: id -> row, its hash table built
        once per export (~0.3 s at 1M items) for every check that looks rows up."""
        if self._row_of is None:
            self._row_of = id_index(self.catalog_ids)
        return self._row_of


def export_run(run_dir: str | Path, model_base: str | Path,
               options: ExportOptions = ExportOptions()) -> ExportResult:
    """Build, check and publish the requested models; returns their paths."""
    unknown = set(options.models) - set(ALL_MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {ALL_MODELS}")
    model_base = Path(model_base)
    ctx = _context(load_run(run_dir), options)
    with export_lock(model_base):
        return _export(ctx, model_base, options)


def _export(ctx: _Context, model_base: Path, options: ExportOptions,
            prebuilt: Optional[PrebuiltScann] = None,
            extra_metadata: Optional[dict] = None,
            checks: RetrievalChecks = FULL_CHECKS) -> ExportResult:
    version = next_version(model_base, list(options.models), options.version)
    tuning = None
    if "retrieval" in options.models and prebuilt is None:
        started = time.perf_counter()
        tuning = _tuning(ctx)
        ctx.seconds["tune"] = round(time.perf_counter() - started, 2)
    result = ExportResult(version, {})
    if any(name.startswith("retrieval") for name in options.models):
        _exact_truth(ctx)  # shared, read-only, by both retrieval models' checks
    with StagedVersion(model_base, list(options.models), version) as stage:
        dirs = {name: stage.dir(name) for name in options.models}  # publish order
        started = time.perf_counter()
        built = _build_concurrently(
            [name for name in _BUILD_ORDER if name in dirs],
            lambda name: _timed(_build_model, name, ctx, dirs[name], tuning, prebuilt, checks))
        ctx.seconds["build_and_check"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        with contextlib.ExitStack() as unprobed:   # a failed probe closes the others too
            for _, _, model in built.values():
                if model is not None:
                    unprobed.enter_context(model)
            for name in options.models:
                model = built[name][2]
                if model is not None:  # timed here, one model at a time, never beside a build
                    with model:        # closed once timed (closing twice is harmless)
                        built[name][0]["latency"] = _latency(model, ctx.user_inputs,
                                                             checks.latency_probes + 1)
        ctx.seconds["latency_probes"] = round(time.perf_counter() - started, 2)
        for name in options.models:
            meta, seconds, _ = built[name]
            meta.update(_common_metadata(name, version, ctx))
            meta.update(extra_metadata or {})
            meta["export_seconds"] = seconds
            write_metadata(dirs[name], meta)
            if options.native_check:
                _native_check(dirs[name])
            result.metadata[name] = meta
        result.paths = stage.publish()
    return result


# The retrieval models first: they take the longest (save ~0.6 GB, load, check).
_BUILD_ORDER = ("retrieval", "retrieval_exact", "candidate_tower", "query_tower")
BUILD_THREADS = 2


def _build_concurrently(names: list[str], build) -> dict:
    """name -> build(name) = (meta, seconds, open SessionModel or None),
    ``BUILD_THREADS`` models at a time: saving and session-checking a model is
    mostly TensorFlow and numpy work that releases the GIL, so two overlap on
    two cores. The first failure is raised once every started build has ended
    (builds not yet started are cancelled, the others' sessions closed)."""
    pool = ThreadPoolExecutor(max_workers=BUILD_THREADS, thread_name_prefix="export")
    futures = {name: pool.submit(build, name) for name in names}
    try:
        return {name: future.result() for name, future in futures.items()}
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures.values():
            if future.done() and not future.cancelled() and future.exception() is None \
                    and future.result()[2] is not None:
                future.result()[2].session.close()
        raise
    finally:
        pool.shutdown(wait=True)


def _timed(fn, *args):
    """(*fn(*args), wall seconds)."""
    started = time.perf_counter()
    meta, model = fn(*args)
    return meta, round(time.perf_counter() - started, 2), model


def _context(run: TrainedRun, options: ExportOptions, items: Optional[pd.DataFrame] = None,
             catalog: Optional[tuple[np.ndarray, np.ndarray]] = None,
             fingerprints: Optional[pd.Series] = None) -> _Context:
    """``catalog`` (ids [N], vectors [N, d]) when the caller has the catalog's
    vectors already (an incremental export); else the whole catalog is embedded."""
    items = read_items(options.items_path, run) if items is None else items
    started = time.perf_counter()
    catalog_ids, catalog_emb = catalog or embed_catalog(run, items, progress=options.progress)
    seconds = {} if catalog else {"embed_catalog": round(time.perf_counter() - started, 2)}
    if fingerprints is None:
        fingerprints = catalog_fingerprints(items, run.spec["candidate"])
    users_path = run.path / "users.parquet"
    users = pd.read_parquet(users_path)
    # Two disjoint user samples: the index is tuned on one and checked on the
    # other, so the recall in the metadata is not measured on its own tuning set.
    drawn = users.sample(min(len(users), 2 * options.sample_queries), random_state=0)
    half = len(drawn) // 2 if len(drawn) > 1 else len(drawn)
    tune_inputs = feature_columns(drawn.iloc[:half], run.spec["query"], str(users_path))
    user_inputs = feature_columns(drawn.iloc[half:] if len(drawn) > 1 else drawn,
                                  run.spec["query"], str(users_path))
    query_emb = run.embed("query", user_inputs)
    tune_emb = run.embed("query", tune_inputs)
    item_sample = items.sample(min(len(items), 64), random_state=0)
    item_inputs = feature_columns(item_sample, run.spec["candidate"], "item table")
    return _Context(run, items, catalog_ids, catalog_emb, user_inputs, query_emb, tune_emb,
                    item_inputs, options, fingerprints, seconds)


def _tuning(ctx: _Context) -> TuningResult:
    o = ctx.options
    k = min(o.k, len(ctx.catalog_ids))
    if o.scann_params is not None:
        return TuningResult(o.scann_params, float("nan"), float("nan"), float("nan"))
    return tune(ctx.catalog_emb, ctx.tune_emb, k, o.recall_target)


def _head(inputs: dict, n: int) -> dict:
    return {k: v[:n] for k, v in inputs.items()}


def _build_model(name: str, ctx: _Context, out: Path, tuning,
                 prebuilt: Optional[PrebuiltScann] = None,
                 checks: RetrievalChecks = FULL_CHECKS) -> dict:
    run, o = ctx.run, ctx.options
    if name in ("query_tower", "candidate_tower"):
        side = "query" if name == "query_tower" else "candidate"
        tower, sig, inputs = ((run.query_tower, run.query_signature, ctx.user_inputs)
                              if side == "query" else
                              (run.candidate_tower, run.candidate_signature, ctx.item_inputs))
        started = time.perf_counter()
        digest = source_digest(run.path / "towers" / side, run.spec[side])
        linked = _link_unchanged_tower(ctx.reuse_towers.get(name), digest, out)
        if linked is None:
            module, signatures = tower_module(tower, sig)
            tf.saved_model.save(module, str(out), signatures=signatures, options=SAVE_OPTIONS)
        saved = time.perf_counter()
        probe = _head(inputs, 64)  # linked or saved, served through the session loader
        got = run_with_session(out, probe)["embedding"]
        check_close(name, got, run.embed(side, probe))
        write_warmup_requests(out, name, [("serving_default", _head(inputs, 1)),
                                          ("serving_default", _head(inputs, 8))])
        return {"signatures": {"serving_default": "raw features -> embedding"},
                "source_digest": digest, "linked_from_version": linked,
                **_step_seconds(started, saved)}, None

    exact = name == "retrieval_exact"
    k = min(o.k, len(ctx.catalog_ids))
    params = None
    if prebuilt is not None and not exact:
        params = prebuilt.params
    elif not exact:
        fetch = min(k + o.max_exclude, len(ctx.catalog_ids))
        params = ScannParams(**{**tuning.params.__dict__, "num_reordering_candidates":
                                max(tuning.params.num_reordering_candidates, fetch)})
    attempts = 1 if prebuilt is not None and not exact else _SCANN_ATTEMPTS
    for attempt in range(attempts):
        started = time.perf_counter()
        index = (brute_force_index(ctx.catalog_emb, k) if exact
                 else prebuilt.layer if prebuilt is not None
                 else scann_index(ctx.catalog_emb, k, params))
        indexed = time.perf_counter()
        module = RetrievalModule(run.query_tower, index, ctx.catalog_ids, k, o.max_exclude,
                                 run.query_signature)
        tf.saved_model.save(module, str(out), signatures=module.signatures(),
                            options=SAVE_OPTIONS)
        saved = time.perf_counter()
        try:
            if checks.saved_arrays:
                check_saved_arrays(name, out, _served_arrays(ctx, exact, prebuilt))
            meta, model = _check_retrieval(name, out, ctx, k, exact, checks)
            meta.update(_step_seconds(indexed, saved))
            meta["seconds"]["index"] = round(indexed - started, 2)
            break
        except _RecallTooLow as err:
            if attempt + 1 == attempts:
                raise RecallTooLowError(str(err)) from None
            params = escalate(params)  # this build's tree fell short: search more
            shutil.rmtree(out)
            out.mkdir()
    if name == "retrieval":  # what the next incremental export compares against
        write_fingerprints(out, ctx.fingerprints)
        write_lists(out, ctx.exact_lists)
        try:
            write_tower_state(out, tower_state(ctx.run.candidate_tower))
        except FullBuildNeeded:
            pass  # a tower that cannot be compared: the next one is a full build anyway
    seen = _seen_matrix(ctx, rows=2, columns=min(3, o.max_exclude))
    write_warmup_requests(out, name, [
        ("serving_default", _head(ctx.user_inputs, 1)),
        ("serving_default", _head(ctx.user_inputs, 8)),
        ("retrieve_excluding", {**_head(ctx.user_inputs, 2), SEEN_INPUT: seen}),
    ])
    meta["index"] = ({"type": "brute_force"} if exact else
                     {"type": "scann", "params": params.__dict__,
                      "tuning": tuning.to_json() if tuning else None,
                      "refreshed": prebuilt is not None})
    meta["k"] = k
    meta["max_exclude"] = o.max_exclude
    meta["checks"] = asdict(checks)
    meta["signatures"] = {
        "serving_default": "raw user features -> item_ids [None, k], scores [None, k]",
        "retrieve_excluding": f"... + {SEEN_INPUT} [None, None] (pad with \"\")"}
    return meta, model


def _link_unchanged_tower(previous: Optional[Path], digest: str, out: Path) -> Optional[int]:
    """Hard-link ``previous`` (a published version of this tower) into ``out`` when
    it was made from the same source (export.tower_reuse); its version, or None
    when the tower must be saved."""
    if previous is None or reusable_version(previous, digest) is None:
        return None
    try:
        link_tower(previous, out)
    except OSError:
        return None
    return int(previous.name)


def _step_seconds(started: float, saved: float) -> dict:
    """{"seconds": {"save", "verify"}}: saving took ``started`` to ``saved``, the
    checks from then to now."""
    return {"seconds": {"save": round(saved - started, 2),
                        "verify": round(time.perf_counter() - saved, 2)}}


def _seen_matrix(ctx: _Context, rows: int, columns: int = 3) -> np.ndarray:
    """A padded [rows, columns] matrix of catalog ids, used to exercise exclusion
    (``columns`` <= the model's max_exclude, or the model rejects it)."""
    ids = ctx.catalog_ids[: min(columns, len(ctx.catalog_ids))].astype(str)
    m = np.full((rows, columns), "", dtype=object)
    m[:, : len(ids)] = ids
    m[-1, -1] = ""
    return m


def _served_arrays(ctx: _Context, exact: bool, prebuilt: Optional[PrebuiltScann]) -> dict:
    """Object path -> the array a retrieval model's variable must hold once saved."""
    n = len(ctx.catalog_ids)
    arrays = {"item_ids": ctx.catalog_ids,
              "index/_identifiers": np.arange(n, dtype=np.int64)}
    if exact:
        arrays["index/_candidates"] = ctx.catalog_emb
    elif prebuilt is not None:
        arrays.update(prebuilt.saved_arrays)
    return arrays


def _exact_truth(ctx: _Context) -> np.ndarray:
    """Exact top-k catalog rows [Q, k] of the sampled users, the same for both
    retrieval models of one export (computed once, before they are built)."""
    k = min(ctx.options.k, len(ctx.catalog_ids))
    if k not in ctx.truth:
        if ctx.exact_lists is None:  # an incremental export carries them over
            ctx.exact_lists = full_lists(ctx.query_emb, ctx.catalog_ids, ctx.catalog_emb,
                                         2 * k)
        ctx.truth[k] = ctx.exact_lists.top_rows(k, ctx.row_of)
    return ctx.truth[k]


def _check_retrieval(name: str, out: Path, ctx: _Context, k: int, exact: bool,
                     checks: RetrievalChecks = FULL_CHECKS) -> tuple[dict, SessionModel]:
    """Session-run the staged model; exact must match numpy (on
    ``checks.exact_queries`` of the sampled users), ScaNN reach the recall on all.

    The model is loaded once, for all checks; it is returned open, for the
    latency probe (closed here when a check fails).
    """
    n = len(ctx.query_emb)
    if exact and checks.exact_queries is not None:
        n = min(n, checks.exact_queries)
    model = SessionModel(out)
    try:
        got = model.run(_head(ctx.user_inputs, n), batch_size=32)
        truth_rows = _exact_truth(ctx)[:n]
        truth_ids = ctx.catalog_ids[truth_rows]
        measured = recall(got["item_ids"], truth_ids)
        if exact:
            check_exact_retrieval(got["item_ids"], got["scores"], ctx.query_emb[:n],
                                  truth_rows, ctx.catalog_ids, ctx.catalog_emb, ctx.row_of)
        elif measured < ctx.options.recall_target:
            raise _RecallTooLow(
                f"retrieval: ScaNN recall@{k} {measured:.4f} is below the target "
                f"{ctx.options.recall_target} on {len(truth_ids)} sampled queries")
        # exclusion: the best exact item of each probe user must disappear
        probe = _head(ctx.user_inputs, 4)
        top1 = np.asarray(truth_ids[:4, :1], dtype=object)
        excl = model.run({**probe, SEEN_INPUT: top1}, "retrieve_excluding")
        for row, seen in zip(excl["item_ids"].astype(str), top1.astype(str)):
            if seen[0] in set(row):
                raise ExportCheckError(f"{name}: retrieve_excluding returned the excluded "
                                       f"item {seen[0]}")
    except BaseException:
        model.session.close()
        raise
    return {f"recall@{k}_vs_exact": round(measured, 4), "checked_queries": n}, model


def _latency(model: SessionModel, inputs: dict, n: int = 301) -> dict:
    """p50/p99 single-query latency (ms) through the session, as the server runs it
    (300 timed queries, so p99 is not simply the slowest one; users cycle)."""
    sig = model.signatures["serving_default"]
    fetch = [v.name for v in sig.outputs.values()]
    times = []
    rows = len(next(iter(inputs.values())))
    for j in range(n):
        i = j % rows
        feed = {sig.inputs[a].name: v[i:i + 1] for a, v in inputs.items()}
        t = time.perf_counter()
        model.session.run(fetch, feed)
        times.append((time.perf_counter() - t) * 1000)
    times = times[1:] or times
    return {"p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3)}


def _common_metadata(name: str, version: int, ctx: _Context) -> dict:
    run = ctx.run
    return {
        "model_name": name,
        "version": version,
        "exported_at": now_iso(),
        "run_dir": str(run.path.resolve()),
        "dataset": run.metrics.get("dataset"),
        "config": run.config_text,
        "training_metrics": {k: run.metrics.get(k) for k in
                             ("model", "popularity", "protocol", "train_seconds")},
        "catalog_size": int(len(ctx.catalog_ids)),
        "embedding_dim": run.embedding_dim,
        "catalog_source": ctx.options.items_path or str(run.path / "items.parquet"),
        "inputs": run.spec["query" if name != "candidate_tower" else "candidate"],
        "export_steps_seconds": dict(ctx.seconds),
    }


def _native_check(version_dir: Path) -> None:
    from export.native_loader import NativeLoadError, check_saved_model, compiler_available

    if not compiler_available():
        raise ExportCheckError(
            "--native-check asked for the C++ SavedModel loader check, but no C++ "
            "compiler (c++, g++ or clang++) is on PATH to build it")
    try:
        check_saved_model(version_dir)
    except NativeLoadError as err:
        raise ExportCheckError(f"{version_dir}: the C++ SavedModel loader failed: {err}")
