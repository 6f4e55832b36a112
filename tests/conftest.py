"""Shared test setup: Keras 2 for TFRS, quiet TF logs, repo root importable."""
import fcntl
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

from tiny_run_config import TINY  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def native_checker_cache(request, tmp_path_factory):
    """One cache for the C++ SavedModel checker per test run, shared by every
    test and by exports with ``native_check`` (through $TWOTOWER_CACHE_DIR),
    never in $HOME. When a collected test needs the checker, its compile (tens
    of seconds) starts at the session's start, beside the tiny training.
    Under pytest-xdist the workers share the cache and one of them compiles
    (a file lock), so the checker is still built once per run."""
    from export import native_loader

    cache = _run_wide_dir(tmp_path_factory, "native-checker")
    build = _CheckerBuild(cache)
    if native_loader.compiler_available() and any(
            "native_checker" in item.fixturenames for item in request.session.items):
        build.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native_loader.CACHE_ENV, str(cache))
        yield build
    if build.ident is not None:   # started: no compile outlives the session
        build.join()


@pytest.fixture(scope="session")
def native_checker(native_checker_cache):
    """The compiled checker's path (waits for the session's one build)."""
    return native_checker_cache.result()


def _run_wide_dir(tmp_path_factory, name: str) -> Path:
    """A directory shared by every xdist worker of this run (each worker's
    base temp is ``<run>/popen-gwN``), or the session's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


class _CheckerBuild(threading.Thread):
    """build_checker(cache) in a thread; ``result()`` joins it (or builds now)."""

    def __init__(self, cache):
        super().__init__(daemon=True, name="native-checker-build")
        self.cache, self.binary, self.error = cache, None, None

    def run(self):
        from export.native_loader import NativeLoadError, build_checker
        try:
            with open(self.cache.with_name(self.cache.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)   # one compile; the others find its binary
                self.binary = build_checker(self.cache)
        except NativeLoadError as err:   # reported by result(), in the test that needs it
            self.error = err

    def result(self):
        if self.ident is not None:
            self.join()
        else:   # not started (no test was collected that needs it): build now
            self.run()
        if self.error:
            raise self.error
        return self.binary


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run shared by the training, export and serving tests."""
    from trainer.config import parse_config
    from trainer.train import train

    return train(parse_config(TINY), tmp_path_factory.mktemp("run"), verbose=0)


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """The four served models exported once from ``tiny_run`` (version 1)."""
    from export.exporter import ExportOptions, export_run

    base = tmp_path_factory.mktemp("models")
    result = export_run(tiny_run.output_dir, base, ExportOptions(k=20, progress=False))
    return base, result


SLOW_FIXTURES = {"tiny_run", "exported"}


def pytest_collection_modifyitems(items):
    """A test that needs the trained run (or its export) is ``slow``: training
    it takes most of a minute, so ``-m "not slow"`` runs without it."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
