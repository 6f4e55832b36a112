"""Keeps the configured models' versions loaded, as TF Serving's manager does.

For every model, a poll (every ``file_system_poll_wait_seconds``) lists the
version directories, applies the version policy, loads and warms up new
aspired versions, and only then unloads versions no longer aspired
(availability-preserving).  Requests get a servable through :meth:`acquire`,
which the unload path waits on, so no request fails during a swap.

Faults on disk never unload a working version:

- a base path that cannot be listed (deleted, renamed away, unmounted, a
  symlink mid-flip) keeps its loaded versions serving and is logged as TF
  Serving logs it ("Could not find base path ..."), until it is back or the
  config changes;
- a base path that lists no version must do so on two polls in a row before
  its versions unload (a directory being deleted passes through that state);
- a version that fails to load is retried ``max_retries`` times, every
  ``interval_seconds`` (TF Serving's ``--max_num_load_retries`` and
  ``--load_retry_interval_micros``; state LOADING meanwhile), so a version
  whose ``variables/`` is still being copied becomes AVAILABLE once complete;
  after the last attempt it ends in END with its error and never replaces a
  working version (it is tried again only if its directory disappears and
  comes back);
- with ``serve_latest_good_version``, the version policy skips versions whose
  last load failed, so a corrupt newest version leaves the latest good one
  serving (also at startup, where TF Serving refuses to start).

Loaded models are moved out of the garbage collector's reach (``gc.freeze``):
with TensorFlow and a model loaded the heap holds ~300k objects, and a full
collection walks them all under the GIL (~0.2 s here), stalling every request.
"""
import gc
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import grpc
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import ServingError, from_exception, invalid_argument, not_found
from serving.version_policy import aspired_versions, list_versions

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
TENSORFLOW_TYPE = model_server_config_pb2.TENSORFLOW   # the deprecated model_type
SHUTTING_DOWN = "Server is shutting down"


@dataclass
class LoadRetryOptions:
    """TF Serving's ``--max_num_load_retries`` (5) and ``--load_retry_interval_micros`` (1 min)."""
    max_retries: int = 5
    interval_seconds: float = 60.0


@dataclass
class VersionStatus:
    version: int
    path: str = ""
    state: int = State.START
    error: Optional[ServingError] = None   # why it ended (END after a failed load)
    servable: Optional[object] = None   # a loaded Servable
    unloaded: bool = False                 # END because it was unloaded, not because it failed
    failed_attempts: int = 0
    retry_at: Optional[float] = None       # time.monotonic() of the next load attempt
    last_error: Optional[ServingError] = None

    @property
    def failed(self) -> bool:
        """Its last load attempt failed (ended, or waiting for a retry)."""
        return self.error is not None or self.retry_at is not None


@dataclass
class ModelEntry:
    config: object                          # tensorflow.serving.ModelConfig
    versions: Dict[int, VersionStatus] = field(default_factory=dict)
    removed: bool = False                   # left out of the config: unloading
    on_disk: Dict[int, str] = field(default_factory=dict)   # the last listing that counted
    base_path_error: Optional[str] = None   # why the base path cannot be listed now
    empty_once: bool = False                # the last listing was empty (not acted on yet)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def policy(self):
        c = self.config
        return c.model_version_policy if c.HasField("model_version_policy") else None

    def serving(self) -> bool:
        return any(s.state == State.AVAILABLE for s in self.versions.values())


class ServableManager:
    """Loads, serves and unloads model versions for a ModelConfigList."""

    def __init__(self, load_fn: Callable, poll_seconds: float = 1.0,
                 retry: Optional[LoadRetryOptions] = None,
                 serve_latest_good_version: bool = False):
        """``load_fn(name, version, path)`` returns a loaded, warmed-up servable."""
        self._load_fn = load_fn
        self._poll_seconds = poll_seconds
        self._retry = retry or LoadRetryOptions()
        self._serve_latest_good = serve_latest_good_version
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._models: Dict[str, ModelEntry] = {}
        self._retired: List[ModelEntry] = []   # replaced by a new base path: unloading
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()         # a retry was scheduled, or stop
        self._draining = False
        self._thread = None

    # -- configuration -------------------------------------------------------
    def set_config(self, model_config_list) -> None:
        """Replaces the served model list (models left out are unloaded).

        Checked as TF Serving's ServerCore checks it, with its messages: a
        name and an absolute base path each, no name twice, and the
        "tensorflow" platform.
        """
        validate_config(model_config_list)
        names = {c.name for c in model_config_list.config}
        with self._lock:
            for c in model_config_list.config:
                entry = self._models.get(c.name)
                if entry is None or entry.removed or entry.config.base_path != c.base_path:
                    if entry is not None and not entry.removed:
                        self._retired.append(entry)
                    self._models[c.name] = ModelEntry(config=c)
                else:
                    entry.config = c
            for name, entry in self._models.items():
                if name not in names:
                    entry.removed = True
            self._changed.notify_all()

    def model_names(self) -> list:
        with self._lock:
            return [n for n, e in self._models.items() if not e.removed]

    # -- polling -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll_loop, name="model-poller",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _next_retry(self) -> float:
        with self._lock:
            return min((st.retry_at for e in self._models.values() if not e.removed
                        for st in e.versions.values() if st.retry_at is not None),
                       default=math.inf)

    def _poll_loop(self) -> None:
        # poll_seconds <= 0: base paths are read once (at start and on config
        # reloads); due load retries still run, on the last listing
        poll = self._poll_seconds if self._poll_seconds > 0 else math.inf
        next_poll = time.monotonic() + poll
        while not self._stop.is_set():
            now = time.monotonic()
            retry_at = self._next_retry()
            if min(next_poll, retry_at) > now:
                wait = min(next_poll, retry_at) - now
                self._wake.wait(None if math.isinf(wait) else wait)
                self._wake.clear()
                continue
            try:
                if next_poll <= now:
                    next_poll = now + poll
                    self.poll_once()
                else:
                    self.retry_due()
            except Exception:  # never let the poller die
                log.exception("model poll failed")

    def poll_once(self) -> None:
        """One pass over all models: list, load aspired versions, unload the rest."""
        self._pass(rescan=True)

    def retry_due(self) -> None:
        """Runs the load retries that are due, on each model's last listing."""
        self._pass(rescan=False)

    def _pass(self, rescan: bool) -> None:
        with self._poll_lock:
            with self._lock:
                live = [e for e in self._models.values() if not e.removed]
            for entry in live:
                if self._stop.is_set():
                    return
                # no retries either while the base path cannot be read
                if self._rescan(entry) if rescan else entry.base_path_error is None:
                    self._apply(entry)
            with self._lock:
                leaving = self._retired + [e for e in self._models.values() if e.removed]
            for entry in leaving:
                self._unload(entry, set(entry.versions))
            with self._lock:
                self._retired = [e for e in self._retired
                                 if any(s.servable for s in e.versions.values())]

    def _rescan(self, entry: ModelEntry) -> bool:
        """Lists the base path into ``entry.on_disk``; False: keep things as they are."""
        base = entry.config.base_path
        try:
            on_disk = list_versions(base)
        except OSError as exc:
            if entry.base_path_error is None:
                loaded = sorted(v for v, s in entry.versions.items()
                                if s.state == State.AVAILABLE)
                log.error("Could not find base path %s for servable %s (%s); keeping "
                          "its loaded version(s) %s serving until it is back or the "
                          "config changes", base, entry.name, exc.strerror or exc,
                          loaded or "(none)")
            entry.base_path_error = str(exc)
            return False
        if entry.base_path_error is not None:
            log.info("Base path %s for servable %s can be read again", base, entry.name)
            entry.base_path_error = None
        if not on_disk:
            if entry.serving() and not entry.empty_once:
                entry.empty_once = True   # a directory being deleted looks like this
                log.warning("No versions of servable %s found under base path %s; its "
                            "loaded versions unload if the next poll finds none either",
                            entry.name, base)
                return False
            if not entry.versions:
                log.warning("No versions of servable %s found under base path %s",
                            entry.name, base)
        entry.empty_once = False
        entry.on_disk = on_disk
        return True

    def _wanted(self, entry: ModelEntry) -> tuple:
        """(aspired, kept): the versions the policy asks for, and those to keep
        loaded (with serve_latest_good_version, also the policy's choice among
        versions whose last load did not fail)."""
        aspired = aspired_versions(entry.policy, entry.on_disk)
        if not self._serve_latest_good:
            return aspired, aspired
        good = {v: p for v, p in entry.on_disk.items()
                if v not in entry.versions or not entry.versions[v].failed}
        return aspired, aspired | aspired_versions(entry.policy, good)

    def _apply(self, entry: ModelEntry) -> None:
        """Loads what the last listing asks for (and due retries), then unloads the rest."""
        while True:   # a failed load can make an older version wanted: go again
            with self._lock:
                aspired, kept = self._wanted(entry)
                now = time.monotonic()
                to_load = []
                for v in sorted(kept, reverse=True):
                    st = entry.versions.get(v)
                    if st is None or (st.state == State.END and st.unloaded):
                        entry.versions[v] = VersionStatus(v, entry.on_disk[v])
                        to_load.append(v)
                    elif st.retry_at is not None and st.retry_at <= now and v in aspired:
                        to_load.append(v)
                for v, st in list(entry.versions.items()):
                    if st.failed and v not in entry.on_disk:
                        del entry.versions[v]   # may be tried again if it comes back
                    elif st.retry_at is not None and v not in aspired:
                        self._give_up(entry, st, "it is no longer aspired")
            if not to_load:
                break
            for v in to_load:
                if self._stop.is_set():
                    return
                self._load(entry, v)
        with self._lock:
            aspired, kept = self._wanted(entry)
            loaded = {v for v, st in entry.versions.items() if st.state == State.AVAILABLE}
            stale = loaded - kept
            if kept and not loaded & kept:
                stale = set()   # keep the old version until a new one is serving
        if stale:
            self._unload(entry, stale)

    def _give_up(self, entry: ModelEntry, st: VersionStatus, why: str) -> None:
        st.state, st.error, st.retry_at = State.END, st.last_error, None
        log.error("Not retrying servable version {name: %s version: %d}: %s",
                  entry.name, st.version, why)
        self._changed.notify_all()

    def _load(self, entry: ModelEntry, version: int) -> None:
        with self._lock:
            st = entry.versions[version]
            st.state, st.retry_at = State.LOADING, None
            self._changed.notify_all()
        log.info("Loading servable version {name: %s version: %d}", entry.name, version)
        started = time.monotonic()
        try:
            servable = self._load_fn(entry.name, version, st.path)
        except Exception as exc:  # noqa: BLE001 - any failure fails this attempt
            self._load_failed(entry, st, from_exception(exc))
            return
        gc.freeze()   # the new version's objects join the permanent generation
        with self._lock:
            st.servable, st.state, st.error, st.last_error = \
                servable, State.AVAILABLE, None, None
            self._changed.notify_all()
        log.info("Successfully loaded servable version {name: %s version: %d} in %.2fs",
                 entry.name, version, time.monotonic() - started)

    def _load_failed(self, entry: ModelEntry, st: VersionStatus, err: ServingError) -> None:
        """Schedules a retry (state stays LOADING, as in TF Serving's retry loop),
        or ends the version with its error once the retries are spent."""
        with self._lock:
            st.failed_attempts += 1
            st.last_error = err
            retries = self._retry.max_retries
            if st.failed_attempts <= retries:
                st.retry_at = time.monotonic() + self._retry.interval_seconds
                log.error("Loading servable version {name: %s version: %d} failed: %s; "
                          "retrying in %gs (retry %d of %d)", entry.name, st.version,
                          err.message, self._retry.interval_seconds, st.failed_attempts,
                          retries)
                self._wake.set()
            else:
                st.state, st.error = State.END, err
                log.error("Loading servable version {name: %s version: %d} failed: %s%s",
                          entry.name, st.version, err.message,
                          f" (after {retries} retries)" if retries else "")
            self._changed.notify_all()

    def _unload(self, entry: ModelEntry, versions: Set[int], reclaim: bool = True) -> None:
        unloaded = False
        for v in sorted(versions):
            with self._lock:
                st = entry.versions.get(v)
                if st is None or st.servable is None:
                    continue
                st.state = State.UNLOADING
                servable = st.servable
                self._changed.notify_all()
            servable.close()   # waits for in-flight requests
            with self._lock:
                st.servable, st.state, st.unloaded = None, State.END, True
                self._changed.notify_all()
            log.info("Unloaded servable version {name: %s version: %d}", entry.name, v)
            unloaded = True
            del servable   # the last reference: let reclaim_frozen() free it
        if unloaded and reclaim:
            reclaim_frozen()

    # -- waiting -------------------------------------------------------------
    def _settled(self, entry: ModelEntry) -> bool:
        """True when a model serves a version, or every aspired load ended."""
        states = [s.state for s in entry.versions.values()]
        if State.AVAILABLE in states:
            return True
        if State.START in states or State.LOADING in states:
            return False
        aspired, _ = self._wanted(entry)
        return all(v in entry.versions for v in aspired)

    def wait_until_settled(self, names: Optional[set] = None,
                           timeout: Optional[float] = None) -> bool:
        """Blocks until the named models (default all) are AVAILABLE or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                targets = [e for n, e in self._models.items()
                           if not e.removed and (names is None or n in names)]
                if all(self._settled(e) for e in targets):
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(timeout=min(0.5, remaining) if remaining else 0.5)

    def unavailable(self, include_empty: bool = True) -> list:
        """Configured models with no AVAILABLE version, described as TF
        Serving's ``WaitUntilConfiguredModelsAvailable`` names them:
        ``{name: M version: N} due to error: CODE: message``.
        ``include_empty``: also models with no version on disk yet."""
        out = []
        with self._lock:
            for name, entry in self._models.items():
                if entry.removed or any(s.state == State.AVAILABLE
                                        for s in entry.versions.values()):
                    continue
                if not entry.versions:
                    if include_empty:
                        out.append(f"{{name: {name}}} due to error: NOT_FOUND: No versions "
                                   f"of servable {name} found under base path "
                                   f"{entry.config.base_path}")
                    continue
                version = max(entry.versions)
                st = entry.versions[version]
                err = st.error or st.last_error
                reason = f" due to error: {err.code_name}: {err.message}" if err else ""
                out.append(f"{{name: {name} version: {version}}}{reason}")
        return out

    def begin_drain(self) -> None:
        """The server is shutting down: model status answers UNAVAILABLE from
        now on (readiness probes fail) while requests are still served."""
        with self._lock:
            self._draining = True

    def unload_all(self) -> None:
        with self._lock:
            entries = self._retired + list(self._models.values())
        for entry in entries:   # shutting down: no collection needed
            self._unload(entry, set(entry.versions), reclaim=False)

    # -- request path --------------------------------------------------------
    def _entry(self, name: str) -> Optional[ModelEntry]:
        entry = self._models.get(name)
        return None if entry is None or entry.removed else entry

    def acquire(self, name: str, version: Optional[int] = None,
                label: Optional[str] = None):
        """The servable a ModelSpec asks for, held until :meth:`release`."""
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        with self._lock:
            entry = self._entry(name)
            if label:
                labels = entry.config.version_labels if entry is not None else {}
                if label not in labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = labels[label]
            if version is None:
                best = None
                if entry is not None:
                    for v, st in entry.versions.items():
                        if st.state == State.AVAILABLE and (best is None or v > best):
                            best = v
                if best is None:
                    raise not_found(f"Servable not found for request: Latest({name})")
                version = best
            st = entry.versions.get(version) if entry is not None else None
            if st is None or st.state != State.AVAILABLE:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            st.servable.acquire()
            return st.servable

    @staticmethod
    def release(servable) -> None:
        servable.release()

    def status(self, name: str, version: Optional[int] = None,
               label: Optional[str] = None) -> list:
        """[(version, state, ServingError|None)], newest first, like GetModelStatus.

        As in TF Serving, only a version narrows the answer: a version label is
        ignored (every version is listed), and an empty name is NOT_FOUND.
        """
        with self._lock:
            if self._draining:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            entry = self._models.get(name)
            versions = entry.versions if entry is not None else {}
            if version is not None:
                st = versions.get(version)
                if st is None:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(st.version, st.state, st.error)]
            if not versions:
                raise not_found(f"Could not find any versions of model {name}")
            return [(v, versions[v].state, versions[v].error)
                    for v in sorted(versions, reverse=True)]


def validate_config(model_config_list) -> None:
    """INVALID_ARGUMENT, with TF Serving's message, for a list it would refuse."""
    seen = set()
    for c in model_config_list.config:
        if not c.name:
            raise invalid_argument("ModelConfig is missing a name")
        if c.name in seen:
            raise invalid_argument(f"Illegal to list model {c.name} multiple times in config list")
        seen.add(c.name)
        if not c.base_path:
            raise invalid_argument(f"ModelConfig for {c.name} is missing a base_path")
        if not os.path.isabs(c.base_path) and "://" not in c.base_path:
            raise invalid_argument(f"Expected model {c.name} to have an absolute path or URI; "
                                   f"got base_path()={c.base_path}")
        platform = c.model_platform or ("tensorflow" if c.model_type == TENSORFLOW_TYPE else "")
        if not platform:
            raise invalid_argument(
                "Illegal setting neither model_type(deprecated) nor model_platform.")
        if platform != "tensorflow":
            raise invalid_argument(
                f"Model {c.name}: unsupported model_platform {platform!r}"
                " (only \"tensorflow\" is served)")


def reclaim_frozen() -> None:
    """Collects what unloaded versions left in the permanent generation (a
    graph's objects form cycles that reference counting alone never frees),
    then freezes the survivors again: one full collection per unload."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def resolve_model_spec(model_spec):
    """(name, version or None, label or None) from a ModelSpec proto."""
    choice = model_spec.WhichOneof("version_choice")
    version = model_spec.version.value if choice == "version" else None
    label = model_spec.version_label if choice == "version_label" else None
    return model_spec.name, version, label


__all__ = ["ServableManager", "State", "resolve_model_spec"]
