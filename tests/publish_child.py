"""The export that tests/test_publish_crash.py kills: the real versioning code,
stopped before its N-th publish rename (run in a subprocess, without pytest)."""
import os
import time
from pathlib import Path

from export.versioning import StagedVersion, export_lock, next_version

MODELS = ["query_tower", "candidate_tower", "retrieval", "retrieval_exact"]


def publish(base, version):
    """Stage and publish ``version`` of MODELS (tiny stand-in version directories)."""
    with StagedVersion(base, MODELS, version) as stage:
        for name in MODELS:
            d = stage.dir(name)
            (d / "variables").mkdir()
            (d / "saved_model.pb").write_text(f"{name} v{version}")
        stage.publish()


def killed_export(base, stop_at, sentinel):
    """The killed export (run in a subprocess): publish the next version, but
    stop before rename ``stop_at`` and wait there for the SIGKILL."""
    real_rename, renames = os.rename, []

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == int(stop_at):
            Path(sentinel).write_text(str(os.getpid()))
            time.sleep(60)          # killed here; never reached in a passing test
        real_rename(src, dst)

    os.rename = rename
    with export_lock(Path(base)):
        publish(Path(base), next_version(Path(base), MODELS))
