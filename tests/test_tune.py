"""The Optuna tuner: search-space paths, pruning, and a 3-trial study that resumes
after a real SIGKILL and writes a best config the trainer loads."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tests.tiny_run_config import TINY
from trainer.config import load_config, parse_config
from trainer.tune import _prune_callback, main, trial_config
from trainer.tuning_space import TunedParameter, apply_params, check_paths, default_space

ROOT = Path(__file__).resolve().parents[1]


def test_paths_walk_sections_and_features_by_name():
    raw = parse_config(TINY).model_dump(mode="json")
    space = default_space(raw)
    out = apply_params(raw, space, {"output_dim": 32, "id_embedding_dim": 128,
                                    "temperature": 0.3, "history": True})
    assert out["model"]["query_tower"]["output_dim"] == 32
    assert out["model"]["candidate_tower"]["output_dim"] == 32
    assert [f["embedding_dim"] for f in out["features"]["item"] if f["name"] == "item_id"] == [128]
    assert out["features"]["user"][-1] == {"name": "history", "type": "history"}
    assert raw["model"]["query_tower"]["output_dim"] == 16  # the base config is untouched
    # switched off again, the feature is removed
    off = apply_params(out, space, {"history": False})
    assert [f["name"] for f in off["features"]["user"]] == ["user_id", "age", "favorite_genres"]
    config = trial_config(raw, space, {"temperature": 0.3}, "val_hr@10")
    assert config.training.validation_fraction == 0.1  # always a validation split
    assert config.training.early_stopping_metric == "val_hr@10"
    assert config.objective.temperature == 0.3


def test_the_default_space_tunes_the_logq_weight_only_where_the_logits_have_one():
    raw = parse_config(TINY).model_dump(mode="json")
    assert raw["objective"]["kind"] == "in_batch_softmax"
    weight = default_space(raw)["logq_weight"]
    assert (weight.paths, weight.low, weight.high) == (["objective.logq_weight"], 0.75, 1.5)
    assert trial_config(raw, default_space(raw), {"logq_weight": 0.9},
                        "val_hr@10").objective.logq_weight == 0.9
    raw["objective"]["logq_correction"] = False
    assert "logq_weight" not in default_space(raw)
    raw["objective"].update(kind="pairwise_hinge", logq_correction=True)
    assert "logq_weight" not in default_space(raw)


def test_a_bad_path_names_what_is_there():
    raw = parse_config(TINY).model_dump(mode="json")
    with pytest.raises(KeyError, match=r"features.user has no feature 'country' "
                                       r"\(features: \['user_id', 'age', 'favorite_genres'\]\)"):
        check_paths(raw, {"x": TunedParameter(kind="int", low=1, high=4,
                                              paths=["features.user.country.embedding_dim"])})
    with pytest.raises(KeyError, match="objective has no key 'temprature'"):
        check_paths(raw, {"x": TunedParameter(kind="float", low=0.1, high=1,
                                              paths=["objective.temprature"])})


def test_parameter_declarations_are_checked():
    with pytest.raises(ValueError, match="needs low < high"):
        TunedParameter(kind="float", paths=["a"], low=1.0, high=1.0)
    with pytest.raises(ValueError, match="log-scale parameter needs low > 0"):
        TunedParameter(kind="float", paths=["a"], low=0.0, high=1.0, log=True)
    with pytest.raises(ValueError, match="at least 2 choices"):
        TunedParameter(kind="categorical", paths=["a"], choices=[1])


def test_a_trial_below_the_median_is_pruned():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1, n_warmup_steps=1))
    good = study.ask()
    for epoch in range(3):
        good.report(0.5, epoch)
    study.tell(good, 0.5)
    trial = study.ask()
    callback = _prune_callback(trial, "val_hr@10")
    callback.on_epoch_end(0, {"val_hr@10": 0.1})  # warm-up epoch: never pruned
    with pytest.raises(optuna.TrialPruned, match="val_hr@10=0.1000 below the median at epoch 2"):
        callback.on_epoch_end(1, {"val_hr@10": 0.1})
    with pytest.raises(KeyError, match="tuning metric 'val_hr@10' not in the epoch logs"):
        _prune_callback(study.ask(), "val_hr@10").on_epoch_end(0, {"loss": 1.0})


def test_study_resumes_after_sigkill_and_writes_a_loadable_best_config(tmp_path):
    config = {**TINY, "name": "tiny-tune",
              "training": {**TINY["training"], "epochs": 2},
              "tuning": {"metric": "val_hr@10", "trials": 3, "seed": 3,
                         "pruning": {"startup_trials": 10},
                         "space": {"temperature": {"kind": "float", "low": 0.1, "high": 0.4,
                                                   "log": True,
                                                   "paths": ["objective.temperature"]},
                                   "epochs": {"kind": "int", "low": 1, "high": 2,
                                              "paths": ["training.epochs"]}}}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    study_dir = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.tune", "--config", str(path),
                             "--output", str(study_dir), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (study_dir / "trials" / "001").exists():  # the second trial has started
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the second trial never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    assert main(["--config", str(path), "--output", str(study_dir), "--quiet"]) == 0

    study = optuna.load_study(study_name="tiny-tune",
                              storage=f"sqlite:///{study_dir / 'study.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert states[1] == "FAIL"  # interrupted by the kill
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == study.trials[1].params
    assert sum(s == "COMPLETE" for s in states.values()) == 3  # the budget, exactly

    best = json.loads((study_dir / "best.json").read_text())
    assert best["trial"] == study.best_trial.number
    assert best["validation"]["val_hr@10"] == study.best_value
    assert set(best["test"]) >= {"hr@10", "hr@50"}
    loaded = load_config(study_dir / "best.yaml")
    assert loaded.objective.temperature == pytest.approx(study.best_params["temperature"])
    assert loaded.training.epochs == study.best_params["epochs"]
    assert loaded.tuning is None
    # refitted on the whole training part: no validation split left
    assert loaded.training.validation_fraction == 0.0
    for png in ("optimization_history.png", "param_importances.png"):
        assert (study_dir / png).stat().st_size > 1000
    summary = (study_dir / "summary.md").read_text()
    assert "chosen on the **validation** split" in summary
    assert "scored once on the **test** split" in summary
    assert "refitted on train + validation" in summary
    # the winner retrained as a full run: its test figures are the ones reported
    run = json.loads((study_dir / "best_run" / "metrics.json").read_text())
    assert best["test"] == run["model"]
    assert (study_dir / "best_run" / "towers" / "query" / "saved_model.pb").is_file()
    # trials never score the test split: only their per-epoch logs stay
    assert sorted(p.name for p in (study_dir / "trials" / "000").iterdir()) == ["history.csv"]
