"""An update killed in training, export or publish leaves the served version
alone, and the next update succeeds without cleaning up by hand."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from update_world import DAY2, copy_runs, shared_initial

HERE = Path(__file__).resolve().parent
MODELS = ("query_tower", "candidate_tower", "retrieval", "retrieval_exact")
SCANN = dict(num_leaves=4, num_leaves_to_search=4, num_reordering_candidates=100)


def _complete(base):
    from export.versioning import existing_versions, is_complete
    return {m: [v for v in existing_versions(base / m) if is_complete(base / m / str(v))]
            for m in MODELS}


def _publish_options():
    from export.scann_tuning import ScannParams
    from updates.publish import PublishOptions
    return PublishOptions(k=20, progress=False, scann_params=ScannParams(**SCANN))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An initial run and version 1 published by a full update."""
    from updates.update import UpdateOptions, run_update

    root = tmp_path_factory.mktemp("faults")
    runs = copy_runs(shared_initial(tmp_path_factory), root)
    run_update("full", runs, root / "models",
               UpdateOptions(until=DAY2 + 43200, publish=_publish_options()))
    return runs, root / "models"


def _killed_update(point, runs, models, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(HERE / "update_kill.py"), point, "--", "incremental",
           "--runs", str(runs), "--models", str(models), "--until", str(DAY2 + 64800),
           "-k", "20", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_killed_updates_leave_the_served_version_and_the_next_one_succeeds(served, tmp_path):
    from updates.lineage import latest_run
    from updates.update import UpdateOptions, run_update

    runs, models = served
    parent = latest_run(runs)
    assert parent.name == "0001-full" and _complete(models) == {m: [1] for m in MODELS}

    _killed_update("train", runs, models, tmp_path)
    assert _complete(models) == {m: [1] for m in MODELS}
    assert (runs / "0002-incremental.staging").is_dir() and latest_run(runs) == parent

    _killed_update("export", runs, models, tmp_path)
    assert _complete(models) == {m: [1] for m in MODELS}
    assert latest_run(runs) == parent           # committed, never published: not a parent
    assert list(models.glob("*/.staging-*"))   # the killed export's, until the next one

    _killed_update("publish", runs, models, tmp_path)
    done = _complete(models)
    assert done["query_tower"] == [1, 2]        # the one model renamed before the kill
    assert all(done[m] == [1] for m in MODELS[1:])

    result = run_update("incremental", runs, models,
                        UpdateOptions(until=DAY2 + 64800, publish=_publish_options()))
    # the half-published 2 is gone and its number skipped; no staging left anywhere
    assert result.version == 3 and _complete(models) == {m: [1, 3] for m in MODELS}
    assert not list(models.glob("*/.staging-*")) and not list(runs.glob("*.staging"))
    assert latest_run(runs) == result.run
