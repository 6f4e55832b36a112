"""Keeps the configured models' versions loaded, as TF Serving's manager does.

For every model, a poll (every ``file_system_poll_wait_seconds``) lists the
version directories, applies the version policy, loads and warms up new
aspired versions, and only then unloads versions no longer aspired
(availability-preserving).  A version that fails to load ends in state END
with its error and never replaces a working one; it is not retried until its
directory disappears.  Requests get a servable through :meth:`acquire`, which
the unload path waits on, so no request fails during a swap.

Loaded models are moved out of the garbage collector's reach (``gc.freeze``):
with TensorFlow and a model loaded the heap holds ~300k objects, and a full
collection walks them all under the GIL (~0.2 s here), stalling every request.
"""
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import ServingError, from_exception, invalid_argument, not_found
from serving.version_policy import aspired_versions, list_versions

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
TENSORFLOW_TYPE = model_server_config_pb2.TENSORFLOW   # the deprecated model_type


@dataclass
class VersionStatus:
    version: int
    state: int = State.START
    error: ServingError = None
    servable: object = None
    unloaded: bool = False   # END because it was unloaded, not because it failed


@dataclass
class ModelEntry:
    config: object                          # tensorflow.serving.ModelConfig
    versions: dict = field(default_factory=dict)
    removed: bool = False

    @property
    def name(self):
        return self.config.name


class ServableManager:
    """Loads, serves and unloads model versions for a ModelConfigList."""

    def __init__(self, load_fn, poll_seconds: float = 1.0):
        """``load_fn(name, version, path)`` returns a loaded, warmed-up servable."""
        self._load_fn = load_fn
        self._poll_seconds = poll_seconds
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._models = {}
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # -- configuration -------------------------------------------------------
    def set_config(self, model_config_list) -> None:
        """Replaces the served model list (models left out are unloaded).

        Checked as TF Serving's ServerCore checks it, with its messages: a
        name and an absolute base path each, no name twice, and the
        "tensorflow" platform.
        """
        validate_config(model_config_list)
        names = [c.name for c in model_config_list.config]
        with self._lock:
            for c in model_config_list.config:
                entry = self._models.get(c.name)
                if entry is None or entry.removed or entry.config.base_path != c.base_path:
                    if entry is not None and not entry.removed:
                        self._retire(entry)
                    self._models[c.name] = ModelEntry(config=c)
                else:
                    entry.config = c
            for name, entry in list(self._models.items()):
                if name not in names and not entry.removed:
                    entry.removed = True
            self._changed.notify_all()

    def _retire(self, entry: ModelEntry) -> None:
        """Unloads every version of an entry replaced by a new base path."""
        entry.removed = True
        old = ModelEntry(config=entry.config, versions=entry.versions, removed=True)
        self._models[f"\0retired:{entry.name}:{id(old)}"] = old

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
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _poll_loop(self) -> None:
        # poll_seconds <= 0: base paths are read once (at start and on config reloads)
        while self._poll_seconds > 0 and not self._stop.wait(self._poll_seconds):
            try:
                self.poll_once()
            except Exception:  # never let the poller die
                log.exception("model poll failed")

    def poll_once(self) -> None:
        """One pass over all models: load aspired versions, unload the rest."""
        with self._poll_lock:
            with self._lock:
                entries = list(self._models.items())
            for key, entry in entries:
                if self._stop.is_set():
                    return
                if entry.removed:
                    self._unload(entry, set(v for v in entry.versions))
                    with self._lock:
                        if not any(s.servable for s in entry.versions.values()) and \
                                key.startswith("\0retired:"):
                            self._models.pop(key, None)
                    continue
                self._sync(entry)

    def _sync(self, entry: ModelEntry) -> None:
        on_disk = list_versions(entry.config.base_path)
        if not on_disk and not entry.versions:
            log.warning("No versions of servable %s found under base path %s",
                        entry.name, entry.config.base_path)
        policy = entry.config.model_version_policy \
            if entry.config.HasField("model_version_policy") else None
        aspired = aspired_versions(policy, on_disk)
        with self._lock:
            to_load = []
            for v in sorted(aspired, reverse=True):
                st = entry.versions.get(v)
                if st is None or (st.state == State.END and st.unloaded):
                    entry.versions[v] = VersionStatus(v, State.START)
                    to_load.append(v)
            # a failed version whose directory went away may be retried later
            for v, st in list(entry.versions.items()):
                if st.state == State.END and st.error is not None and v not in on_disk:
                    del entry.versions[v]
        for v in to_load:
            if self._stop.is_set():
                return
            self._load(entry, v, on_disk[v])
        with self._lock:
            serving_aspired = any(
                entry.versions[v].state == State.AVAILABLE
                for v in aspired if v in entry.versions)
            loaded = {v for v, st in entry.versions.items() if st.state == State.AVAILABLE}
            stale = loaded - aspired
            if not (serving_aspired or not aspired):
                stale = set()   # keep the old version until a new one is serving
        if stale:
            self._unload(entry, stale)

    def _load(self, entry: ModelEntry, version: int, path: str) -> None:
        with self._lock:
            entry.versions[version].state = State.LOADING
            self._changed.notify_all()
        log.info("Loading servable version {name: %s version: %d}", entry.name, version)
        started = time.monotonic()
        try:
            servable = self._load_fn(entry.name, version, path)
        except Exception as exc:  # noqa: BLE001 - any failure ends the version
            err = from_exception(exc)
            log.error("Loading servable version {name: %s version: %d} failed: %s",
                      entry.name, version, err.message)
            with self._lock:
                st = entry.versions[version]
                st.state, st.error = State.END, err
                self._changed.notify_all()
            return
        gc.freeze()   # the new version's objects join the permanent generation
        with self._lock:
            st = entry.versions[version]
            st.servable, st.state = servable, State.AVAILABLE
            self._changed.notify_all()
        log.info("Successfully loaded servable version {name: %s version: %d} in %.2fs",
                 entry.name, version, time.monotonic() - started)

    def _unload(self, entry: ModelEntry, versions: set, reclaim: bool = True) -> None:
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
        if any(s == State.AVAILABLE for s in states):
            return True
        if any(s in (State.START, State.LOADING) for s in states):
            return False
        on_disk = list_versions(entry.config.base_path)
        policy = entry.config.model_version_policy \
            if entry.config.HasField("model_version_policy") else None
        aspired = aspired_versions(policy, on_disk)
        return all(v in entry.versions for v in aspired)

    def wait_until_settled(self, names=None, timeout: float = None) -> bool:
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
                err = entry.versions[version].error
                reason = f" due to error: {err.code_name}: {err.message}" if err else ""
                out.append(f"{{name: {name} version: {version}}}{reason}")
        return out

    def unload_all(self) -> None:
        with self._lock:
            entries = list(self._models.values())
        for entry in entries:   # shutting down: no collection needed
            self._unload(entry, set(entry.versions), reclaim=False)

    # -- request path --------------------------------------------------------
    def _entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        return None if entry is None or entry.removed else entry

    def acquire(self, name: str, version: int = None, label: str = None):
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

    def status(self, name: str, version: int = None, label: str = None) -> list:
        """[(version, state, ServingError|None)], newest first, like GetModelStatus.

        As in TF Serving, only a version narrows the answer: a version label is
        ignored (every version is listed), and an empty name is NOT_FOUND.
        """
        with self._lock:
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
