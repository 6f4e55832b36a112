"""The ``tuning:`` section of a run config: what ``python -m trainer.tune`` searches.

A parameter names one or more dotted paths into the run config and how its
value is drawn; every path gets the same value (so the two towers' output
dims stay tied). A path walks mappings by key and feature lists by feature
name: ``features.item.item_id.embedding_dim``. A ``feature`` parameter turns a
feature on or off (``spec`` is what is added when the base config lacks it).

    tuning:
      metric: val_hr@100          # per-epoch validation HR@K, maximised
      trials: 30                  # over all resumptions of the study
      timeout_minutes: 30         # wall clock of one invocation (optional)
      space:
        temperature: {kind: float, paths: [objective.temperature], low: 0.05, high: 0.5, log: true}
        output_dim: {kind: categorical, paths: [model.query_tower.output_dim,
                                                 model.candidate_tower.output_dim],
                     choices: [32, 64, 128]}
        history: {kind: feature, side: user, spec: {name: history, type: history}}

Without ``space`` the default for the in-batch softmax is used
(``default_space``): temperature, learning rate, epochs, id embedding dims,
output dims, the history feature on/off and, where the logits carry a logQ
term, its weight.
"""
from __future__ import annotations

import copy
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TunedParameter(_Strict):
    kind: Literal["float", "int", "categorical", "feature"]
    paths: list[str] = Field(default_factory=list)
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: list[Union[bool, int, float, str]] = Field(default_factory=list)
    side: Optional[Literal["user", "item"]] = None
    spec: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _consistent(self) -> "TunedParameter":
        if self.kind in ("float", "int"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a {self.kind} parameter needs low < high")
            if self.log and self.low <= 0:
                raise ValueError("a log-scale parameter needs low > 0")
        if self.kind == "categorical" and len(self.choices) < 2:
            raise ValueError("a categorical parameter needs at least 2 choices")
        if self.kind == "feature":
            if self.side is None or not self.spec or "name" not in self.spec:
                raise ValueError("a feature parameter needs side (user|item) and a spec "
                                 "with a name")
        elif not self.paths:
            raise ValueError(f"a {self.kind} parameter needs at least one path")
        return self


class PruningConfig(_Strict):
    """Median pruning on the per-epoch validation metric (Optuna MedianPruner)."""

    startup_trials: int = Field(3, ge=0, description="trials never pruned, to build a median")
    warmup_epochs: int = Field(2, ge=0, description="epochs of each trial never pruned")


class TuningConfig(_Strict):
    metric: str = "val_hr@100"
    trials: int = Field(30, gt=0)
    timeout_minutes: Optional[float] = Field(None, gt=0)
    seed: int = 0
    pruning: PruningConfig = PruningConfig()
    space: Optional[dict[str, TunedParameter]] = None

    @model_validator(mode="after")
    def _metric(self) -> "TuningConfig":
        k = self.metric.removeprefix("val_hr@")
        if k == self.metric or not k.isdigit() or int(k) < 1:
            raise ValueError(f"tuning.metric must be val_hr@K (K > 0), got {self.metric!r}")
        return self


def default_space(raw: dict) -> dict[str, TunedParameter]:
    """The in-batch-softmax search space, fitted to the features of ``raw``."""
    space = {
        "temperature": TunedParameter(kind="float", paths=["objective.temperature"],
                                      low=0.05, high=0.5, log=True),
        "learning_rate": TunedParameter(kind="float", paths=["training.learning_rate"],
                                        low=1e-3, high=2e-2, log=True),
        "epochs": TunedParameter(kind="int", paths=["training.epochs"], low=3, high=20),
        "output_dim": TunedParameter(kind="categorical", choices=[32, 64, 128],
                                     paths=["model.query_tower.output_dim",
                                            "model.candidate_tower.output_dim"]),
        "history": TunedParameter(kind="feature", side="user",
                                  spec={"name": "history", "type": "history"}),
    }
    objective = raw["objective"]
    if objective["kind"] == "in_batch_softmax" and objective["logq_correction"]:
        # below 0.75 it cost steeply on ML-100K's validation split, 1.25 won on both
        # data sets, 1.5 gave back HR@100 (docs/TOOLKIT.md)
        space["logq_weight"] = TunedParameter(kind="float", paths=["objective.logq_weight"],
                                              low=0.75, high=1.5)
    ids = [f"features.{side}.{name}.embedding_dim"
           for side, name in (("user", "user_id"), ("item", "item_id"))
           if any(f.get("name") == name for f in raw["features"][side])]
    if ids:
        space["id_embedding_dim"] = TunedParameter(kind="categorical", paths=ids,
                                                   choices=[32, 64, 128])
    return space


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set ``raw[a][b]...`` = value for ``path`` "a.b..." (in place).

    Lists of features are indexed by feature name. A missing key or feature
    is an error naming the path and what was there.
    """
    node: Any = raw
    parts = path.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "<config>"
        if isinstance(node, list):
            match = [f for f in node if isinstance(f, dict) and f.get("name") == part]
            if not match:
                names = [f.get("name") for f in node if isinstance(f, dict)]
                raise KeyError(f"tuning path {path!r}: {where} has no feature {part!r} "
                               f"(features: {names})")
            if last:
                raise KeyError(f"tuning path {path!r} ends at a whole feature")
            node = match[0]
        elif isinstance(node, dict):
            if part not in node:
                raise KeyError(f"tuning path {path!r}: {where} has no key {part!r} "
                               f"(keys: {sorted(node)})")
            if last:
                node[part] = value
            else:
                node = node[part]
        else:
            raise KeyError(f"tuning path {path!r}: {where} is a value, not a section")


def check_paths(raw: dict, space: dict[str, TunedParameter]) -> None:
    """Raise KeyError naming the first path of ``space`` that ``raw`` lacks."""
    probe = copy.deepcopy(raw)
    for p in space.values():
        for path in p.paths:
            set_path(probe, path, None)


def apply_params(raw: dict, space: dict[str, TunedParameter],
                 params: dict[str, Any]) -> dict:
    """A copy of the full config dict ``raw`` with sampled ``params`` set."""
    out = copy.deepcopy(raw)
    for name, value in params.items():
        p = space[name]
        if p.kind == "feature":
            features = out["features"][p.side]
            present = [f for f in features if f.get("name") == p.spec["name"]]
            if value and not present:
                features.append(copy.deepcopy(p.spec))
            elif not value and present:
                features.remove(present[0])
            continue
        for path in p.paths:
            set_path(out, path, value)
    return out
