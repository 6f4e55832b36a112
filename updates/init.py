"""``python -m updates init``: start a lineage, trained and served in one step.

Trains ``RUNS/initial`` with the trainer, publishes it as version 1 through
the update's publish path and writes a model config for the server, so the
next ``full`` / ``incremental`` update continues from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from export.exporter import ALL_MODELS
from export.run_artifacts import feature_columns, load_run
from trainer.config import load_config
from trainer.train import train
from updates.lineage import PUBLISHED_FILE, write_json_atomic
from updates.publish import PublishOptions, publish_run


@dataclass
class Started:
    run: Path
    version: int
    model_config: Path
    serve_command: str
    curl_command: str


def write_model_config(model_base: Path) -> Path:
    """MODEL_BASE/models.config (TF Serving's text format) for the four models."""
    base = Path(model_base).resolve()
    path = base / "models.config"
    path.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{m}" base_path: "{base / m}" model_platform: "tensorflow" }}\n'
        for m in ALL_MODELS) + "}\n")
    return path


def example_request(run_dir: Path) -> dict:
    """A REST predict body for the retrieval model: the first user of the run."""
    run = load_run(run_dir)
    users = pd.read_parquet(Path(run_dir) / "users.parquet").head(1)
    columns = feature_columns(users, run.spec["query"], "users.parquet")
    return {"instances": [{k: (v[0].item() if hasattr(v[0], "item") else str(v[0]))
                           for k, v in columns.items()}]}


def start_lineage(config_path: Path, runs_dir: Path, model_base: Path,
                  options: PublishOptions = PublishOptions(), verbose=None) -> Started:
    run = Path(runs_dir) / "initial"
    train(load_config(config_path), run, verbose=verbose)
    result = publish_run(run, model_base, options)
    write_json_atomic(run / PUBLISHED_FILE, {"version": result.version,
                                             "model_base": str(Path(model_base).resolve())})
    config = write_model_config(model_base)
    body = json.dumps(example_request(run))
    return Started(run, result.version, config,
                   f"python -m serving --model_config_file={config}",
                   "curl -s -X POST localhost:8501/v1/models/retrieval:predict "
                   f"-d '{body}'")
