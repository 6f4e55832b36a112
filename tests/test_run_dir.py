"""The staging directory of a training run: commit, refusal, repair after a cut commit."""
import pytest

from trainer import run_dir


def _run(path, text):
    path.mkdir()
    (path / run_dir.RUN_MARKER).write_text(text)
    return path


def test_commit_replaces_the_old_run_and_leaves_nothing_beside_it(tmp_path):
    out = _run(tmp_path / "run", "old")
    staging = run_dir.open_staging(out, resumable=lambda d: False)
    assert staging == tmp_path / "run.staging" and list(staging.iterdir()) == []
    (staging / run_dir.RUN_MARKER).write_text("new")
    run_dir.commit(out)
    assert (out / run_dir.RUN_MARKER).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in out.iterdir()) == [run_dir.RUN_MARKER]


def test_an_unresumable_staging_dir_is_started_afresh_a_resumable_one_kept(tmp_path):
    out = tmp_path / "run"
    stale = run_dir.staging_dir(out)
    stale.mkdir()
    (stale / "history.csv").write_text("epoch,loss\n")
    assert list(run_dir.open_staging(out, resumable=lambda d: False).iterdir()) == []
    (stale / "backup").mkdir()
    kept = run_dir.open_staging(out, resumable=lambda d: (d / "backup").exists())
    assert [p.name for p in kept.iterdir()] == ["backup"]


def test_refuses_to_replace_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a training run directory"):
        run_dir.open_staging(tmp_path, resumable=lambda d: False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_commit_cut_between_its_renames_is_finished_next_time(tmp_path):
    out = tmp_path / "run"
    _run(tmp_path / "run.replaced", "old")          # first rename done ...
    staging = _run(tmp_path / "run.staging", "new")   # ... second one not
    (staging / ".complete").touch()
    run_dir.open_staging(out, resumable=lambda d: False)
    assert (out / run_dir.RUN_MARKER).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.staging"]


def test_a_cut_commit_of_an_unfinished_staging_dir_puts_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    _run(tmp_path / "run.replaced", "old")
    run_dir.open_staging(out, resumable=lambda d: False)
    assert (out / run_dir.RUN_MARKER).read_text() == "old"
