"""End to end on tiny synthetic data: trains, beats popularity, writes artifacts."""
import json
import logging
import shutil

import pytest

from tiny_run_config import TINY
from trainer.config import parse_config
from trainer.train import train


def test_beats_popularity(tiny_run):
    m = tiny_run.metrics
    assert m["model"]["hr@10"] > m["popularity"]["hr@10"] * 1.2
    assert m["model"]["hr@50"] > m["popularity"]["hr@50"]


def test_artifacts_written(tiny_run):
    out = tiny_run.output_dir
    for name in ("towers/query/saved_model.pb", "towers/candidate/saved_model.pb",
                 "metrics.json", "history.json", "report.md", "training.png",
                 "feature_spec.json", "items.parquet", "config.yaml"):
        assert (out / name).exists(), name
    spec = json.loads((out / "feature_spec.json").read_text())
    assert [f["name"] for f in spec["candidate"]] == ["item_id", "category", "tags", "price"]
    assert spec["embedding_dim"] == 16
    assert "hr@10" in (out / "report.md").read_text().lower()
    assert len(tiny_run.history["loss"]) == 6


class _Interrupt(Exception):
    pass


class _StopAfter(__import__("tensorflow").keras.callbacks.Callback):
    """Simulates a crash at the end of an epoch, after the backup was written."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise _Interrupt()


@pytest.mark.slow
def test_failed_training_keeps_the_good_run_and_a_rerun_resumes(tiny_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(tiny_run.output_dir, out)   # a finished run
    before = {name: (out / name).read_bytes() for name in
              ("config.yaml", "metrics.json", "towers/query/saved_model.pb",
               "towers/candidate/variables/variables.data-00000-of-00001")}
    config = parse_config({**TINY, "name": "second", "training": {**TINY["training"],
                                                                    "epochs": 3},
                           "data": {**TINY["data"], "num_users": 150, "num_items": 80}})
    with pytest.raises(_Interrupt):
        train(config, out, verbose=0, extra_callbacks=[_StopAfter(2)])
    # the failed training touched nothing of the finished run ...
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.staging"]
    assert (tmp_path / "run.staging" / "backup").exists()
    with caplog.at_level(logging.INFO, logger="trainer"):
        resumed = train(config, out, verbose=0)
    # ... and the same command again resumed it: epochs 1-2 were restored from the
    # backup, only epoch 3 ran, and the run's history still covers all three
    assert ("resumed an interrupted training: epochs 1-2 restored from its backup, "
            "continuing with epoch 3 of 3") in caplog.text
    assert len(resumed.history["loss"]) == 3
    assert resumed.metrics["epochs_run"] == 3
    assert (out / "checkpoints" / "epoch-003.index").exists()
    assert "name: second" in (out / "config.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text()) == resumed.metrics != tiny_run.metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_validation_metric_and_early_stopping(tmp_path):
    config = parse_config({**TINY, "data": {**TINY["data"], "num_users": 150,
                                            "num_items": 80},
                           "training": {**TINY["training"], "epochs": 30,
                                        "validation_fraction": 0.2,
                                        "early_stopping_patience": 1,
                                        "early_stopping_metric": "val_hr@10"}})
    run = train(config, tmp_path, verbose=0)
    assert len(run.history["val_hr@10"]) == len(run.history["loss"])
    assert len(run.history["loss"]) < 30  # stopped early
    # patience 1: every epoch improved val_hr@10 but the last, which stopped it
    hr10 = run.history["val_hr@10"]
    assert all(b > a for a, b in zip(hr10[:-2], hr10[1:-1])), hr10
    assert hr10[-1] <= max(hr10[:-1]), hr10
    # 80 items: HR@100 ranks the whole catalog, every validation click is a hit
    assert run.history["val_hr@100"] == [1.0] * len(hr10)
