"""A publish is all-or-none even when the export is SIGKILLed between renames.

A child process publishes version 2 of four models with the real
export.versioning code; its ``os.rename`` stops before the N-th rename (the
publish's own renames, the journal uses ``os.replace``), touches a sentinel
and waits there to be killed with a real SIGKILL. The next export's lock
acquisition must leave every model on the same version.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.versioning import (JOURNAL_FILE, STAGING_PREFIX, StagedVersion, export_lock,
                               existing_versions, finish_interrupted_publish)

REPO = Path(__file__).resolve().parent.parent
MODELS = ["query_tower", "candidate_tower", "retrieval", "retrieval_exact"]

CHILD = r"""
import os, sys, time
from pathlib import Path
from export.versioning import StagedVersion, export_lock, next_version

base, stop_at, sentinel = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
renames = 0
real_rename = os.rename

def rename(src, dst):
    global renames
    renames += 1
    if renames == stop_at:
        sentinel.write_text(str(os.getpid()))
        time.sleep(60)          # killed here; never reached in a passing test
    real_rename(src, dst)

os.rename = rename
models = sys.argv[4].split(",")
with export_lock(base):
    version = next_version(base, models)
    with StagedVersion(base, models, version) as stage:
        for name in models:
            d = stage.dir(name)
            (d / "variables").mkdir()
            (d / "saved_model.pb").write_text(f"{name} v{version}")
        stage.publish()
"""


def _publish(base, version, marker="v"):
    with StagedVersion(base, MODELS, version) as stage:
        for name in MODELS:
            d = stage.dir(name)
            (d / "variables").mkdir()
            (d / "saved_model.pb").write_text(f"{name} {marker}{version}")
        stage.publish()


def _kill_at_rename(base, stop_at, tmp_path):
    """Run the child until it is about to do rename ``stop_at``, then SIGKILL it."""
    sentinel = tmp_path / f"at-rename-{stop_at}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(base), str(stop_at),
                              str(sentinel), ",".join(MODELS)], env=env,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sentinel.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the rename"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def _versions(base):
    return {name: existing_versions(base / name) for name in MODELS}


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4])
def test_killed_publish_is_rolled_forward_by_the_next_export(tmp_path, stop_at):
    base = tmp_path / "models"
    _publish(base, 1)
    _kill_at_rename(base, stop_at, tmp_path)
    # the kill really left a torn publish: the first stop_at - 1 models are at 2
    torn = _versions(base)
    assert [torn[m] for m in MODELS] == ([[1, 2]] * (stop_at - 1)
                                         + [[1]] * (len(MODELS) - stop_at + 1))
    assert json.loads((base / JOURNAL_FILE).read_text())["version"] == 2
    with export_lock(base):   # the next export: finishes the publish, then stages
        assert _versions(base) == {m: [1, 2] for m in MODELS}
    for name in MODELS:
        assert (base / name / "2" / "saved_model.pb").read_text() == f"{name} v2"
    assert not (base / JOURNAL_FILE).exists()
    assert not list(base.glob(f"*/{STAGING_PREFIX}*"))
    _publish(base, 3)         # and the next publish goes on from there
    assert _versions(base) == {m: [1, 2, 3] for m in MODELS}


def test_killed_publish_whose_staging_vanished_is_rolled_back(tmp_path):
    base = tmp_path / "models"
    _publish(base, 1)
    _kill_at_rename(base, 3, tmp_path)
    stagings = {name: json.loads((base / JOURNAL_FILE).read_text())["models"][name]
                for name in MODELS}
    import shutil
    shutil.rmtree(base / "retrieval" / stagings["retrieval"])   # e.g. an operator's cleanup
    assert finish_interrupted_publish(base) == "back"
    with export_lock(base):
        pass
    assert _versions(base) == {m: [1] for m in MODELS}
    assert not (base / JOURNAL_FILE).exists()
    assert not list(base.glob(f"*/{STAGING_PREFIX}*"))


def test_no_journal_is_left_after_a_publish_or_a_failed_one(tmp_path):
    base = tmp_path / "models"
    _publish(base, 1)
    assert not (base / JOURNAL_FILE).exists()
    assert finish_interrupted_publish(base) is None
    with pytest.raises(RuntimeError, match="check failed"):
        with StagedVersion(base, MODELS, 2) as stage:
            stage.dir("query_tower")
            raise RuntimeError("check failed")
    assert not (base / JOURNAL_FILE).exists()
    assert _versions(base) == {m: [1] for m in MODELS}
