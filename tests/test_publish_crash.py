"""A publish is all-or-none even when the export is SIGKILLed between renames.

A child process publishes version 2 of four models with the real
export.versioning code; its ``os.rename`` stops before the N-th rename (the
publish's own renames, the journal uses ``os.replace``), touches a sentinel
and waits there to be killed with a real SIGKILL (tests/publish_child.py). The next export's lock
acquisition must leave every model on the same version.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.versioning import (JOURNAL_FILE, STAGING_PREFIX, StagedVersion, export_lock,
                               existing_versions, finish_interrupted_publish)
from publish_child import MODELS, publish as _publish

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

def _kill_at_rename(base, stop_at, tmp_path):
    """Run the child until it is about to do rename ``stop_at``, then SIGKILL it."""
    sentinel = tmp_path / f"at-rename-{stop_at}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(HERE)]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, publish_child as c; c.killed_export(*sys.argv[1:])",
         str(base), str(stop_at), str(sentinel)], env=env, stderr=subprocess.PIPE)
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


def test_an_unreadable_journal_stops_the_next_export(tmp_path):
    from export.versioning import VersionError

    base = tmp_path / "models"
    _publish(base, 1)
    (base / JOURNAL_FILE).write_text("{not json")
    with pytest.raises(VersionError, match=r"\.publish-journal\.json: unreadable publish "
                                           r"journal"):
        with export_lock(base):
            pass
    assert _versions(base) == {m: [1] for m in MODELS}
