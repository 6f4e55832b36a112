"""The tiny drifting world the model-update tests share: 4 days, an initial
run trained on days 0-1, updates on days 2-3."""
from tiny_run_config import TINY

DAY2 = 1700006400 + 2 * 86400      # 2023-11-17T00:00:00Z, the initial run's end
DAY3 = DAY2 + 86400

DRIFT = dict(TINY,
             name="tiny-drift",
             data={"kind": "synthetic", "num_users": 200, "num_items": 100,
                   "exposures_per_user": 10, "days": 4, "seed": 3,
                   "drift": {"new_users_per_day": 20, "new_items_per_day": 10},
                   "until": DAY2},
             objective={"logq_weight": 1.0},    # as configs/drifting.yaml: new items every day
             training={"epochs": 3, "batch_size": 128, "learning_rate": 0.01},
             evaluation={"protocol": "temporal", "test_days": 0.5, "ks": [10, 50]})


def train_initial(root):
    """Train the initial run into ``root/runs/initial``; returns the runs dir."""
    from trainer.config import parse_config
    from trainer.train import train

    runs = root / "runs"
    train(parse_config(DRIFT), runs / "initial", verbose=0)
    return runs


def shared_initial(tmp_path_factory):
    """The initial run, trained once per test session (the update test modules
    share it; each test copies it before updating)."""
    root = tmp_path_factory.getbasetemp() / "drift-initial"
    if not (root / "runs" / "initial" / "model").is_dir():
        train_initial(root)
    return root / "runs"


def copy_runs(src, dst):
    """A fresh copy of a runs dir (each test updates its own lineage)."""
    import shutil

    shutil.copytree(src, dst / "runs", symlinks=True)
    return dst / "runs"
