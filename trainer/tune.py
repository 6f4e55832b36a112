"""``python -m trainer.tune``: fit a run config's knobs on the validation split (Optuna).

Each trial trains one config drawn by Optuna's TPE sampler from the
``tuning.space`` of the config (trainer/tuning_space.py) and reports its
per-epoch validation HR@K; Optuna's MedianPruner stops a trial whose
validation curve falls below the median of earlier trials at the same epoch.
Only the validation split (carved from the training part by the test
split's rule, never the test split) guides the search: trials prepare, build
and fit (trainer.train's steps) without ever scoring the test split. At the
end the best trial is refitted on the whole training part (train + validation) as a
full run (``best_run/``) and scored on the test split once.

The study lives in ``STUDY/study.db`` (SQLite): a killed tuner started again
with the same arguments resumes it; the trial it was running is marked failed
and run again with the same parameters. One tuner at a time per study (a
lock file), one trial at a time (2 cores).

Writes into STUDY/: ``best.yaml`` (a config ``python -m trainer --config``
takes), ``best.json`` (parameters, validation and test figures),
``summary.md``, ``trials.csv``, ``optimization_history.png``,
``param_importances.png``, ``best_run/`` (the best trial as a full run
directory: ``python -m export --run STUDY/best_run`` serves it) and
``trials/NNN/history.csv`` (each trial's per-epoch logs).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

_CONFIG_ATTR = "config"      # trial user attribute: the trial's full config (JSON)
_RETRY_ATTR = "retry_of"     # trial user attribute: the interrupted trial it re-runs
_EPOCHS_ATTR = "epochs"      # trial user attribute: epochs of the model the trial ended with
DEFAULT_VALIDATION_FRACTION = 0.1


@dataclass
class StudyResult:
    best_trial: int
    best_params: dict
    validation: float          # the tuning metric of the best trial (validation split)
    test: dict                 # the best trial's metrics on the test split
    best_config: Path
    finished_trials: int


def _prune_callback(trial, metric: str):
    """A Keras callback: report ``logs[metric]`` each epoch, prune when told."""
    import optuna
    import tensorflow as tf

    class ReportValidation(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            if value is None:
                raise KeyError(f"tuning metric {metric!r} not in the epoch logs "
                               f"({sorted(logs or {})})")
            trial.report(float(value), step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric}={value:.4f} below the median at "
                                         f"epoch {epoch + 1}")

    return ReportValidation()


@contextmanager
def _study_lock(study_dir: Path):
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".tune.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{study_dir}: another tuner is running on this study") from None
        yield


def trial_config(raw: dict, space: dict, params: dict, metric: str):
    """The validated RunConfig of one trial: base config + sampled params.

    A validation split is always there (when the base config has none: 10 %
    of the training clicks, or under the temporal protocol the last
    ``test_days`` days before the test days), and the tuning metric is logged
    every epoch.
    """
    from trainer.config import parse_config
    from trainer.tuning_space import apply_params

    out = apply_params(raw, space, params)
    out["tuning"] = None
    training = out["training"]
    if not (training.get("validation_fraction") or training.get("validation_days")):
        if out["evaluation"]["protocol"] == "temporal":
            training["validation_days"] = out["evaluation"]["test_days"]
        else:
            training["validation_fraction"] = DEFAULT_VALIDATION_FRACTION
    training["early_stopping_metric"] = metric
    return parse_config(out, "tuning trial")


def refit_config(trial_raw: dict, epochs: Optional[int], source: str):
    """The config the winner is refitted with: every tuned knob kept, trained on
    the whole training part (train + validation, as the test split's model
    always is); with early stopping, for the epochs its trial ended with."""
    from trainer.config import parse_config

    out = json.loads(json.dumps(trial_raw))
    training = out["training"]
    if training.get("early_stopping_patience") and epochs:
        training["epochs"] = int(epochs)
    training.update(validation_fraction=0.0, validation_days=0.0, early_stopping_patience=0)
    return parse_config(out, source)


def _suggest(trial, space: dict) -> dict:
    params = {}
    for name, p in space.items():
        if p.kind == "float":
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif p.kind == "int":
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log,
                                             step=int(p.step or 1))
        elif p.kind == "categorical":
            params[name] = trial.suggest_categorical(name, p.choices)
        else:
            params[name] = trial.suggest_categorical(name, [True, False])
    return params


def _fit_trial(config, tables, out: Path, prune, metric: str) -> tuple[float, int]:
    """Prepare, build and fit one trial (the test split is never scored here):
    (its validation metric, the epochs of that model). Only ``history.csv``
    stays in ``out``."""
    import shutil

    import tensorflow as tf

    from trainer.prepare import prepare_data
    from trainer.train import build_model, fit

    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(config.training.seed)
    out.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare_data(config, tables)
        fitted = fit(build_model(config, prepared), prepared, config, out, verbose=0,
                     extra_callbacks=[prune])
    finally:
        for part in out.iterdir():
            if part.name != "history.csv":
                shutil.rmtree(part) if part.is_dir() else part.unlink()
    values = fitted.history[metric]
    if config.training.early_stopping_patience:   # restore_best_weights: the best epoch
        best = int(max(range(len(values)), key=values.__getitem__))
        return values[best], best + 1
    return values[-1], len(values)


def _retry_interrupted(study, storage) -> int:
    """Trials left RUNNING by a killed tuner (we hold the study lock, so none
    runs now): mark them failed and queue their parameters again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        # FrozenTrial has no public id; Optuna's own RetryFailedTrialCallback uses it too
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={_RETRY_ATTR: t.number},
                            skip_if_exists=False)
        log.warning("trial %d was interrupted: queued again with the same parameters",
                    t.number)
    return len(stale)


def run_study(config, study_dir: str | Path, trials: Optional[int] = None,
              timeout_minutes: Optional[float] = None, tables=None,
              progress: bool = True) -> StudyResult:
    """Run (or resume) the study of ``config.tuning`` and write its results."""
    import optuna
    from tqdm import tqdm

    from trainer.config import ConfigError
    from trainer.data import load_tables
    from trainer.tuning_space import TuningConfig, check_paths, default_space

    tuning = config.tuning or TuningConfig()
    budget = trials or tuning.trials
    timeout = timeout_minutes or tuning.timeout_minutes
    raw = config.model_dump(mode="json")
    space = tuning.space or default_space(raw)
    check_paths(raw, space)   # a typo in a path fails now, not after hours of trials
    study_dir = Path(study_dir)
    with _study_lock(study_dir):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(study_dir / 'study.db').resolve()}")
        study = optuna.create_study(
            study_name=config.name, storage=storage, direction="maximize",
            load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=tuning.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=tuning.pruning.startup_trials,
                                               n_warmup_steps=tuning.pruning.warmup_epochs))
        _retry_interrupted(study, storage)
        counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=counted))
        tables = tables if tables is not None else load_tables(config.data)

        def objective(trial) -> float:
            trial_cfg = trial_config(raw, space, _suggest(trial, space), tuning.metric)
            trial.set_user_attr(_CONFIG_ATTR, trial_cfg.model_dump(mode="json"))
            value, epochs = _fit_trial(trial_cfg, tables,
                                       study_dir / "trials" / f"{trial.number:03d}",
                                       _prune_callback(trial, tuning.metric), tuning.metric)
            trial.set_user_attr(_EPOCHS_ATTR, epochs)
            return value

        bar = tqdm(total=budget, initial=min(done, budget), desc=f"tuning {config.name}",
                   unit="trial", disable=not progress)

        def on_trial_end(study, frozen):
            if frozen.state in counted:
                bar.update(1)
            best = [t for t in study.get_trials(deepcopy=False)
                    if t.state == optuna.trial.TrialState.COMPLETE]
            if best:
                bar.set_postfix({tuning.metric: f"{max(t.value for t in best):.4f}"})

        if done < budget:
            # Failed trials do not count towards the budget; n_trials bounds a
            # run of failures, MaxTrialsCallback stops at the budget exactly.
            study.optimize(objective, n_trials=2 * (budget - done) + 2,
                           timeout=None if timeout is None else 60 * timeout,
                           callbacks=[optuna.study.MaxTrialsCallback(budget, states=counted),
                                      on_trial_end],
                           catch=(ConfigError,), gc_after_trial=True)
        bar.close()
        return _write_results(study, study_dir, tuning.metric, tables)


def _write_results(study, study_dir: Path, metric: str, tables) -> StudyResult:
    """The best trial refitted on the whole training part as a full run
    (``best_run/``, exportable) and scored once on the test split; best.yaml / best.json / summary / plots."""
    import optuna

    from trainer.config import dump_config, parse_config
    from trainer.train import train

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"{study_dir}: no trial of the study has completed yet")
    best = study.best_trial
    best_config = refit_config(best.user_attrs[_CONFIG_ATTR], best.user_attrs.get(_EPOCHS_ATTR),
                               f"trial {best.number}")
    text = dump_config(best_config)
    (study_dir / "best.yaml").write_text(
        f"# best of {len(complete)} completed trials (study {study.study_name}): "
        f"{metric} = {best.value:.4f} on the validation split\n" + text, encoding="utf-8")
    best_run = study_dir / "best_run"
    done = best_run / "metrics.json"
    if not (done.is_file() and (best_run / "config.yaml").read_text(encoding="utf-8") == text):
        log.warning("retraining the best trial (%d) as a full run in %s", best.number, best_run)
        train(best_config, best_run, tables, verbose=0)
    run_metrics = json.loads(done.read_text(encoding="utf-8"))
    result = StudyResult(best.number, dict(best.params), float(best.value),
                         run_metrics["model"], study_dir / "best.yaml",
                         len(study.get_trials(deepcopy=False)))
    (study_dir / "best.json").write_text(json.dumps({
        "trial": best.number, "params": best.params,
        "validation": {metric: best.value},
        "test": run_metrics["model"], "test_popularity": run_metrics["popularity"],
        "test_ease": run_metrics.get("ease"), "run": str(best_run),
    }, indent=2), encoding="utf-8")
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    frame.to_csv(study_dir / "trials.csv", index=False)
    notes = _plots(study, study_dir)
    ks = sorted(int(k.split("@")[1]) for k in run_metrics["model"] if k.startswith("hr@"))

    def hrs(m: dict) -> str:
        return ", ".join(f"HR@{k} {m[f'hr@{k}']:.3f}" for k in ks)

    ease = run_metrics.get("ease", {})
    lines = [f"# Study `{study.study_name}`", "",
             f"- trials: {len(complete)} completed, "
             f"{sum(t.state.name == 'PRUNED' for t in study.trials)} pruned, "
             f"{sum(t.state.name == 'FAIL' for t in study.trials)} failed",
             f"- chosen on the **validation** split: trial {best.number}, "
             f"{metric} = {best.value:.4f}",
             "- parameters: " + ", ".join(f"`{k}` = {v}" for k, v in best.params.items()),
             f"- refitted on train + validation as `best_run/` and scored once on the "
             f"**test** split: "
             f"{hrs(run_metrics['model'])} (most popular: {hrs(run_metrics['popularity'])}"
             + (f"; EASE: {hrs(ease)}" if "l2" in ease else "") + ")",
             "", "![history](optimization_history.png)", "",
             "![importances](param_importances.png)" if not notes else notes, ""]
    (study_dir / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    return result


def _plots(study, study_dir: Path) -> str:
    """Optuna's matplotlib plots as PNGs; returns a note when one cannot be drawn."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings of optuna's plots
        ax = ovm.plot_optimization_history(study)
        ax.figure.tight_layout()
        ax.figure.savefig(study_dir / "optimization_history.png", dpi=100)
        plt.close(ax.figure)
        try:
            ax = ovm.plot_param_importances(study)
        except (RuntimeError, ValueError) as err:
            return f"(no parameter importances: {err})"
        ax.figure.tight_layout()
        ax.figure.savefig(study_dir / "param_importances.png", dpi=100)
        plt.close(ax.figure)
    return ""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.tune",
        description="Tune a run config on its validation split with Optuna (TPE, median "
                    "pruning, SQLite storage: a killed study resumes). Writes best.yaml, "
                    "best.json, summary.md and plots into --output.")
    p.add_argument("--config", type=Path, required=True,
                   help="YAML run config; its tuning: section declares the search space "
                        "(default: the in-batch-softmax space, trainer/tuning_space.py)")
    p.add_argument("--override", type=Path, action="append", default=[],
                   help="partial YAML config merged over --config (repeatable)")
    p.add_argument("--output", type=Path, required=True,
                   help="study directory (re-running with the same one resumes)")
    p.add_argument("--data-path", default=None, help="override data.path in the config")
    p.add_argument("--trials", type=int, default=None,
                   help="trial budget over all resumptions (default: tuning.trials)")
    p.add_argument("--timeout-minutes", type=float, default=None,
                   help="wall-clock budget of this invocation (default: tuning.timeout_minutes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag, value in (("--trials", args.trials), ("--timeout-minutes", args.timeout_minutes)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        config = load_config(args.config, args.override, args.data_path)
        started = time.perf_counter()
        result = run_study(config, args.output, args.trials, args.timeout_minutes,
                           progress=not args.quiet)
    except (ConfigError, DataError, KeyError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    test = ", ".join(f"{k.upper()}={v:.3f}" for k, v in result.test.items()
                     if k.startswith("hr@"))
    print(f"\nbest trial {result.best_trial} of {result.finished_trials}: validation "
          f"{result.validation:.4f}; test {test} "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"best config: {result.best_config}  (python -m trainer --config "
          f"{result.best_config} --output runs/tuned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
