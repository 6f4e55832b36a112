"""Run configuration: a YAML file validated into typed pydantic models.

Errors name the offending field path (e.g. ``features.user.2.type``) and the
file, so a typo in a config never turns into a silent default.
"""
from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.objective_registry import OBJECTIVE_KINDS, OBJECTIVES, check_objective
from trainer.tuning_space import TuningConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- data
class _Windowed(_Strict):
    """Every data kind can be cut to the time window [since, until) after loading
    (trainer.data.windows): unix seconds, or an ISO-8601 date or date-time
    (UTC unless it names a zone); either bound may be left open."""

    since: Optional[int] = None
    until: Optional[int] = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _unix_seconds(cls, value):
        return value if value is None else unix_seconds(value)

    @model_validator(mode="after")
    def _ordered(self):
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since ({self.since}) must be earlier than until ({self.until})")
        return self


def unix_seconds(value) -> int:
    """int seconds from an int, a digit string, a datetime/date or an ISO-8601 string."""
    if isinstance(value, bool):
        raise ValueError(f"expected a timestamp, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected unix seconds or an ISO-8601 date/time, "
                             f"got {value!r}") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp())
    raise ValueError(f"expected unix seconds or an ISO-8601 date/time, got {value!r}")


class DriftConfig(_Strict):
    """Multi-day mode of the synthetic world (trainer.data.drifting): stable
    long-term tastes, short-term interests and trends that move from day to
    day, users and items arriving daily, items retiring."""

    new_users_per_day: int = Field(100, ge=0)
    new_items_per_day: int = Field(50, ge=0)
    item_lifetime_days: float = Field(30.0, ge=0.0, description="mean (geometric); 0 = never")
    active_share: float = Field(0.35, gt=0.0, le=1.0, description="users active on a day")
    trend_genres: int = Field(2, ge=0, le=11, description="genres trending at a time")
    trend_turnover: float = Field(0.5, ge=0.0, le=1.0,
                                  description="daily chance a trending genre is replaced")
    trend_weight: float = Field(0.6, ge=0.0)
    interest_weight: float = Field(0.5, ge=0.0)
    interest_switch: float = Field(0.3, ge=0.0, le=1.0,
                                   description="daily chance a user's interest genre changes")

    @field_validator("item_lifetime_days")
    @classmethod
    def _lifetime(cls, days: float) -> float:
        if 0 < days < 1:
            raise ValueError(f"must be 0 (never retire) or >= 1, got {days}")
        return days


class SyntheticData(_Windowed):
    """The embedded default: a seeded generator (see trainer.data.synthetic).

    With ``drift`` (``drift: {}`` for its defaults) the world runs for
    ``days`` days: num_users / num_items are the day-0 population and
    exposures_per_user the exposures of one session (one per active user and
    day); see trainer.data.drifting.
    """

    kind: Literal["synthetic"] = "synthetic"
    num_users: int = Field(3000, gt=1)
    num_items: int = Field(1500, gt=1)
    exposures_per_user: int = Field(60, gt=0)
    latent_dim: int = Field(8, gt=0)
    days: int = Field(14, gt=0)
    seed: int = 0
    drift: Optional[DriftConfig] = None


class MovieLens100K(_Windowed):
    kind: Literal["movielens-100k"]
    path: str


class MovieLensLatest(_Windowed):
    kind: Literal["movielens-latest"]
    path: str


class TableSource(_Strict):
    """A CSV or Parquet file and the mapping from canonical to file columns.

    ``columns`` maps a canonical name to a file column: its name, or its
    0-based position. ``header: false`` reads a CSV file without a header
    line; its columns are then named by ``names`` (all of them, in order) or
    only reachable by position.
    """

    path: str
    columns: dict[str, Union[int, str]] = Field(default_factory=dict)
    separator: str = Field(",", min_length=1)
    header: bool = True
    names: Optional[list[str]] = Field(None, min_length=1)

    @field_validator("columns")
    @classmethod
    def _positions(cls, columns: dict) -> dict:
        bad = [k for k, v in columns.items() if isinstance(v, int) and v < 0]
        if bad:
            raise ValueError(f"column positions are 0-based, got {bad[0]}: {columns[bad[0]]}")
        return columns

    @model_validator(mode="after")
    def _names_fit_header(self) -> "TableSource":
        if self.names is not None and self.header:
            raise ValueError("'names' names the columns of a file without a header line: "
                             "set 'header: false' (or drop 'names')")
        if not self.header and self.names is None:
            by_name = [k for k, v in self.columns.items() if isinstance(v, str)]
            if by_name:
                raise ValueError(f"header: false and no 'names': map {by_name} by 0-based "
                                 "position (e.g. user_id: 0), or give 'names'")
            if not self.columns:
                raise ValueError("header: false needs 'columns' (positions) or 'names'")
        return self


class GenericData(_Windowed):
    """Generic CSV/Parquet tables with a column mapping per table."""

    kind: Literal["tables"]
    interactions: TableSource
    users: Optional[TableSource] = None
    items: Optional[TableSource] = None
    ranking_log: Optional[TableSource] = None


class ShardData(_Windowed):
    """A shard directory written by ``python -m trainer.shards`` (a manifest and
    Parquet files). ``stream: true`` trains on the interactions streamed from
    the files (trainer.streaming: a data set larger than memory; only what
    ``streaming_refusals`` allows), ``false`` reads every table into memory
    like the other kinds. ``shuffle_buffer``: rows the streamed input mixes."""

    kind: Literal["shards"]
    path: str
    stream: bool = True
    shuffle_buffer: int = Field(100_000, gt=0)


DataConfig = Annotated[
    Union[SyntheticData, MovieLens100K, MovieLensLatest, GenericData, ShardData],
    Field(discriminator="kind"),
]


# ----------------------------------------------------------------------- features
class CategoricalFeature(_Strict):
    """A discrete value -> vocabulary (or hashing) -> embedding."""

    name: str
    type: Literal["categorical"]
    embedding_dim: int = Field(16, gt=0)
    vocabulary: Literal["adapt", "hashing"] = "adapt"
    num_oov_buckets: int = Field(1, ge=1)
    max_tokens: Optional[int] = Field(None, gt=1)
    hash_bins: int = Field(100_000, gt=1)


class MultiCategoricalFeature(_Strict):
    """Several values in one string joined by ``separator`` -> pooled embedding."""

    name: str
    type: Literal["multi_categorical"]
    embedding_dim: int = Field(16, gt=0)
    separator: str = "|"
    num_oov_buckets: int = Field(1, ge=1)
    max_tokens: Optional[int] = Field(None, gt=1)
    pooling: Literal["mean", "sum"] = "mean"


class ContinuousFeature(_Strict):
    """A float -> normalized value and/or quantile buckets -> embedding."""

    name: str
    type: Literal["continuous"]
    normalize: bool = True
    log1p: bool = False
    buckets: int = Field(0, ge=0, description="quantile buckets; 0 = none")
    embedding_dim: int = Field(8, gt=0)


class TextFeature(_Strict):
    """Free text -> TextVectorization -> mean-pooled token embedding."""

    name: str
    type: Literal["text"]
    embedding_dim: int = Field(16, gt=0)
    max_tokens: int = Field(5000, gt=2)
    max_length: int = Field(16, gt=0)


class HistoryFeature(_Strict):
    """The user's past clicked items, computed by the trainer -> pooled embedding.

    A user feature only. The trainer builds it from the training clicks (the
    last ``max_items`` by time, joined with ``separator``) and adds it to the
    users table, so it reaches the query tower like any multi-valued string
    feature (and the exported tower takes it as one). No leakage: when the
    model trains on the positive (user, item), that item is removed from the
    user's history (``leave_out: target``); at evaluation and serving the
    history is all of the user's training items. ``dropout`` drops each
    history item with that probability during training (robustness to the
    short histories of new users).
    """

    name: str = "history"
    type: Literal["history"]
    embedding_dim: int = Field(32, gt=0)
    separator: str = "|"
    max_items: int = Field(200, gt=0)
    # mean / sum: pooled embeddings; attention / recency: weighted by a learned
    # attention over items and/or a learned bias per position from the newest
    # (trainer.history_attention).
    pooling: Literal["mean", "sum", "attention", "recency"] = "mean"
    attention_units: int = Field(32, gt=0)
    # Read the history through the item tower's own item_id embeddings (one
    # table for both towers: a new click moves the user vector at serving time
    # through the vector the item is retrieved by). embedding_dim then is the
    # item_id feature's.
    share_item_embeddings: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


FeatureConfig = Annotated[
    Union[CategoricalFeature, MultiCategoricalFeature, ContinuousFeature, TextFeature,
          HistoryFeature],
    Field(discriminator="type"),
]


class FeaturesConfig(_Strict):
    user: list[FeatureConfig]
    item: list[FeatureConfig]

    @model_validator(mode="after")
    def _ids_present(self) -> "FeaturesConfig":
        for side, id_name in (("user", "user_id"), ("item", "item_id")):
            names = [f.name for f in getattr(self, side)]
            if len(set(names)) != len(names):
                raise ValueError(f"features.{side}: duplicate feature names {names}")
        if any(f.type == "history" for f in self.item):
            raise ValueError("features.item: a 'history' feature belongs to the user tower")
        if sum(f.type == "history" for f in self.user) > 1:
            raise ValueError("features.user: at most one 'history' feature")
        if "item_id" not in [f.name for f in self.item]:
            raise ValueError("features.item must include the 'item_id' feature "
                             "(retrieval returns item ids)")
        shared = [f for f in self.user if f.type == "history" and f.share_item_embeddings]
        item_id = next(f for f in self.item if f.name == "item_id")
        if shared and (item_id.type != "categorical" or item_id.vocabulary != "adapt"):
            raise ValueError("features.user history.share_item_embeddings needs the item_id "
                             "feature to be categorical with vocabulary: adapt")
        if shared and "embedding_dim" in shared[0].model_fields_set \
                and shared[0].embedding_dim != item_id.embedding_dim:
            raise ValueError(f"features.user history.share_item_embeddings: the history is "
                             f"embedded by item_id's table (embedding_dim "
                             f"{item_id.embedding_dim}), not {shared[0].embedding_dim}")
        if shared:   # say it, so a dumped run config (all fields written) loads again
            shared[0].embedding_dim = item_id.embedding_dim
        return self


# -------------------------------------------------------------------------- model
class TowerConfig(_Strict):
    hidden_units: list[int] = Field(default_factory=list)
    output_dim: int = Field(64, gt=0)
    # On the input of every Dense layer (the concatenated feature embeddings,
    # then each hidden layer's output), so it also acts without hidden layers.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    l2_normalize: bool = True
    # An ensemble inside one tower: ``members`` independent towers (own
    # encoders and layers), each trained with its own loss; the output is
    # their embeddings concatenated and scaled by 1/sqrt(members), so the
    # exported dot product is the members' mean score. Embedding size:
    # members * output_dim.
    members: int = Field(1, ge=1)


class ModelConfig(_Strict):
    query_tower: TowerConfig = TowerConfig()
    candidate_tower: TowerConfig = TowerConfig()


# ---------------------------------------------------------------------- objective
# The kinds, their batches and the options each uses: trainer.objective_registry.
ObjectiveKind = Literal[OBJECTIVE_KINDS]


class StreamingLogQ(_Strict):
    """``objective.logq: streaming``: the estimator's settings (trainer.frequency)."""

    num_buckets: int = Field(100_000, gt=0, description="hash buckets per hash")
    num_hashes: int = Field(2, ge=1, le=4)
    alpha: float = Field(0.01, gt=0.0, lt=1.0, description="moving-average rate")
    initial_gap: float = Field(100.0, gt=0.0, description="gap of a bucket not yet seen twice")


# objective.logq_weight of in_batch_softmax when unset: +2.5 % +- 0.1 mean val HR@10 /
# HR@100 over w = 1 on ML-100K and synthetic, 3 seeds each (docs/TOOLKIT.md).
IN_BATCH_LOGQ_WEIGHT = 1.25


class ObjectiveConfig(_Strict):
    """How the towers are trained (docs/TOOLKIT.md compares them).

    - ``in_batch_softmax`` (default): TFRS Retrieval, in-batch sampled softmax
      whose negatives are the batch's other positives (plus
      ``sampling.negatives.extra_candidates``), logits corrected by -log q.
    - ``matrix_factorization``: the baseline: id embeddings, inner product,
      squared error on (user, item, y), y = 1 clicked, 0 exposed-not-clicked.
    - ``pointwise``: binary cross-entropy on cos/temperature, 1 for the
      positive, 0 for each of its sampled negatives.
    - ``pairwise_hinge``: max(0, cos(a, b-) + margin - cos(a, b+)).
    - ``pairwise_logistic``: log(1 + exp(sigma * (cos(a, b-) - cos(a, b+)))).
    - ``listwise``: softmax cross-entropy over one positive and its N
      sampled negatives (-log s+), optionally logQ-corrected.
    """

    kind: ObjectiveKind = "in_batch_softmax"
    # 0.2 measured best (HR@100 0.625 vs 0.534 at 0.05) on ML-100K; GUIDE.md 4.
    temperature: float = Field(0.2, gt=0.0, description="logits = cos / temperature "
                               "(in_batch_softmax, listwise, pointwise)")
    logq_correction: bool = True
    # Weighted correction: logits get -w log q instead of -log q. 1 = the full
    # sampled-softmax correction; below 1 keeps part of the popularity penalty
    # in-batch negatives teach (0 = none), above 1 adds a popularity prior.
    # Unset: IN_BATCH_LOGQ_WEIGHT for in_batch_softmax with logq_correction (won
    # on the validation splits of ML-100K and synthetic, docs/TOOLKIT.md), else 1
    # (listwise was not tuned); a dumped run config writes the value it trained with.
    logq_weight: Optional[float] = Field(None, ge=0.0, le=2.0, description="w in the logQ "
                                         "term -w log q (in_batch_softmax, listwise; needs "
                                         "logq_correction); unset = 1.25 for in_batch_softmax, "
                                         "else 1")
    # Where q comes from: the training data's click counts (static), or the
    # streaming estimate updated every training step (new and trending items).
    logq: Literal["static", "streaming"] = "static"
    streaming: StreamingLogQ = StreamingLogQ()
    remove_accidental_hits: bool = True
    num_hard_negatives: Optional[int] = Field(
        None, gt=0, description="in_batch_softmax: keep only the k negatives the model "
        "scores highest per query (raw cosines, before logQ); None = all")
    margin: float = Field(0.2, ge=0.0, description="pairwise_hinge margin m")
    sigma: float = Field(10.0, gt=0.0, description="pairwise_logistic scale")
    l2_regularization: float = Field(
        1e-4, ge=0.0, description="matrix_factorization: weight of ||u||^2 + ||v||^2")
    unobserved_per_row: int = Field(
        0, ge=0, description="matrix_factorization: uniformly sampled unobserved items "
        "per row, y = 0 (needed where the data has no exposed-not-clicked rows)")
    unobserved_weight: float = Field(0.1, gt=0.0, description="weight of those rows")

    @model_validator(mode="after")
    def _default_logq_weight(self):
        if self.logq_weight is None:
            tuned = self.kind == "in_batch_softmax" and self.logq_correction
            self.logq_weight = IN_BATCH_LOGQ_WEIGHT if tuned else 1.0
        return self


# ----------------------------------------------------------------------- sampling
class PositiveSampling(_Strict):
    """Re-balance training positives by item click frequency.

    ``subsample_threshold`` t (word2vec-style): a click on item i is kept with
    probability min(1, sqrt(t / f_i)), f_i = the item's share of clicks,
    redrawn every epoch; 0 = off. Items with fewer than ``upsample_below``
    clicks have their clicks repeated ``upsample_factor`` times.
    """

    subsample_threshold: float = Field(0.0, ge=0.0)
    upsample_below: int = Field(0, ge=0)
    upsample_factor: int = Field(1, ge=1)


class NegativeSampling(_Strict):
    """Where negatives come from (never the user's clicked or exposed items).

    Per-query objectives (pointwise, pairwise_*, listwise) get
    ``num_negatives`` per positive: a share ``hard_fraction`` hard (from the
    ranking log, or mined as the model's highest-scoring non-positives among
    ``mining_pool`` sampled items), the rest easy, drawn from the catalog with
    p ∝ clicks^alpha. ``in_batch_softmax`` adds ``extra_candidates`` catalog
    samples per batch (mixed negative sampling), each with its logQ term.
    """

    num_negatives: int = Field(2, ge=1)
    alpha: float = Field(0.75, ge=0.0)
    hard_fraction: float = Field(0.0, ge=0.0, le=1.0)
    hard_source: Literal["auto", "ranking_log", "mined"] = "auto"
    mining_pool: int = Field(256, ge=1)
    extra_candidates: int = Field(0, ge=0)
    extra_logq: Literal["mixture", "per_source"] = "mixture"
    mask_user_positives: bool = Field(
        False, description="in_batch_softmax: the query user's other clicked items in "
        "the batch are not negatives either (its exposed-not-clicked ones never are)")


class SamplingConfig(_Strict):
    positives: PositiveSampling = PositiveSampling()
    negatives: NegativeSampling = NegativeSampling()


# ----------------------------------------------------------------------- training
class TrainingConfig(_Strict):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(1024, gt=1)
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    learning_rate: float = Field(0.005, gt=0.0)
    seed: int = 42
    early_stopping_patience: int = Field(0, ge=0, description="0 = off")
    early_stopping_metric: str = "val_hr@100"
    # The validation split is cut from the training part by the test split's rule:
    # random protocols take a seeded share of the training clicks, the temporal
    # protocol the last days before the test days. Early stopping, tuning and
    # EASE's L2 are chosen on it; the test split is scored once, at the end.
    validation_fraction: float = Field(0.0, ge=0.0, lt=0.5, description=(
        "random protocols: share of the training clicks held out for validation"))
    validation_days: float = Field(0.0, ge=0.0, description=(
        "temporal protocol: the last days of the training part held out for validation"))

    @field_validator("early_stopping_metric")
    @classmethod
    def _logged_metric(cls, metric: str) -> str:
        k = metric.removeprefix("val_hr@")
        if k == metric or not k.isdigit() or int(k) < 1:
            raise ValueError(f"training.early_stopping_metric must be val_hr@K (K > 0), "
                             f"got {metric!r}")
        return metric

    @property
    def early_stopping_k(self) -> int:
        """The K of ``early_stopping_metric`` (val_hr@K), logged by validation."""
        return int(self.early_stopping_metric.removeprefix("val_hr@"))


# --------------------------------------------------------------------- evaluation
class EvaluationConfig(_Strict):
    """Split protocol and cut-offs.

    ``ml100k-random``: rows permuted with numpy default_rng(seed), first
    ``train_fraction`` train. ``temporal``: interactions ordered by time; the
    last ``test_days`` days are the test set.
    """

    protocol: Literal["ml100k-random", "random", "temporal"] = "random"
    seed: int = 42
    train_fraction: float = Field(0.8, gt=0.0, lt=1.0)
    test_days: float = Field(1.0, gt=0.0)
    ks: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1)
    # EASE (trainer.ease) beside most-popular in every report: L2 chosen on the
    # validation split (a default cut of the training part when none is set).
    ease: bool = True
    ease_max_items: int = Field(20_000, gt=0, description="catalogs above it skip EASE")
    ease_l2: list[float] = Field(default_factory=lambda: [50.0, 150.0, 500.0, 1500.0, 5000.0],
                                 min_length=1)

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every K must be >= 1, got {ks}")
        return ks


class RunConfig(_Strict):
    name: str = "run"
    data: DataConfig = SyntheticData()
    features: FeaturesConfig
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    sampling: SamplingConfig = SamplingConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tuning: Optional[TuningConfig] = None   # read by python -m trainer.tune only

    @model_validator(mode="after")
    def _objective_fits(self) -> "RunConfig":
        q, c = self.model.query_tower, self.model.candidate_tower
        if q.members * q.output_dim != c.members * c.output_dim or q.members != c.members:
            raise ValueError("model.query_tower and model.candidate_tower need the same "
                             "output_dim and members (their dot product is the score)")
        if q.members > 1 and any(f.type == "history" and f.share_item_embeddings
                                 for f in self.features.user):
            raise ValueError("features.user history.share_item_embeddings needs members: 1 "
                             "(ensemble members have tables of their own)")
        check_objective(self)
        if streamed(self.data):
            refused = streaming_refusals(self)
            if refused:
                raise ValueError("; ".join(refused))
        tc = self.training
        temporal = self.evaluation.protocol == "temporal"
        if temporal and tc.validation_fraction:
            raise ValueError("training.validation_fraction applies to the random protocols; "
                             "under the temporal protocol use training.validation_days (the "
                             "last days before the test days)")
        if not temporal and tc.validation_days:
            raise ValueError("training.validation_days applies to the temporal protocol; "
                             f"under {self.evaluation.protocol} use "
                             "training.validation_fraction")
        if tc.early_stopping_patience and not (tc.validation_fraction or tc.validation_days):
            raise ValueError("training.early_stopping_patience needs a validation split "
                             "(training.validation_fraction > 0, or training.validation_days "
                             "> 0 under the temporal protocol): it watches validation HR@K")
        return self


def streamed(data) -> bool:
    """Whether a run's training clicks are streamed from shard files."""
    return isinstance(data, ShardData) and data.stream


def streaming_refusals(config: "RunConfig") -> list[str]:
    """What a streamed run (``data: {kind: shards, stream: true}``) cannot do,
    each with the reason: everything that needs the whole interactions table
    in memory (docs/DISTRIBUTED.md)."""
    whole = "needs every interaction in memory; use data.stream: false"
    neg, pos, ev, tc = (config.sampling.negatives, config.sampling.positives,
                        config.evaluation, config.training)
    checks = {
        f"objective.kind={config.objective.kind}":
            (OBJECTIVES[config.objective.kind].batch != "in_batch",
             "per-query and labelled objectives draw negatives outside each user's whole "
             "set of clicked and exposed items, which " + whole),
        "sampling.negatives.extra_candidates": (
            neg.extra_candidates > 0, "their score mask (the user's own items) " + whole),
        "sampling.negatives.mask_user_positives": (neg.mask_user_positives,
                                                   "the mask " + whole),
        "sampling.positives": (pos.subsample_threshold > 0 or pos.upsample_below > 0,
                               "re-balancing is not built for streamed input"),
        "features.user history": (any(f.type == "history" for f in config.features.user),
                                  "each user's whole click history " + whole),
        f"evaluation.protocol={ev.protocol}": (
            ev.protocol != "temporal", "a random split permutes the whole table; streamed "
            "input splits by time (protocol: temporal)"),
        "training.validation_days": (tc.validation_days > 0,
                                     "a streamed run has no validation split"),
        "evaluation.ease": (ev.ease, "EASE fits the whole click matrix; set "
                            "evaluation.ease: false"),
        "data.since/until": (config.data.since is not None or config.data.until is not None,
                             "time windows are not applied to streamed shards"),
    }
    return [f"{key}: not supported with streamed input (data.kind=shards, stream: true): "
            f"{why}" for key, (refused, why) in checks.items() if refused]


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


def parse_config(raw: dict, source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            line = f"  {loc}: {e['msg']}"
            if e["type"] in ("extra_forbidden", "missing"):
                section = _section_model(e["loc"][:-1])
                if section is not None:
                    line += f" (valid keys here: {', '.join(section.model_fields)})"
            lines.append(line)
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def _section_model(loc: Sequence) -> Optional[type[BaseModel]]:
    """The config model at a pydantic error location (``data.tables.users``...).

    Discriminated unions put the tag in the location (``tables``,
    ``categorical``); list items their index.
    """
    node = RunConfig
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return None
            node = node.model_fields[part].annotation
            continue
        origin, args = get_origin(node), get_args(node)
        if origin is Union and isinstance(part, str):
            tagged = [m for m in args if isinstance(m, type) and issubclass(m, BaseModel)
                      and part in _tags(m)]
            if len(tagged) != 1:
                return None
            node = tagged[0]
        elif origin in (list, tuple) and isinstance(part, int):
            node = args[0]
        elif origin is dict:
            node = args[1]
        else:
            return None
    node = _unwrap(node)
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unwrap(node):
    """Annotated[X, ...] -> X; Optional[X] -> X."""
    while True:
        if get_origin(node) is Annotated:
            node = get_args(node)[0]
        elif get_origin(node) is Union and type(None) in get_args(node):
            rest = [a for a in get_args(node) if a is not type(None)]
            node = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return node


def _tags(model: type[BaseModel]) -> tuple:
    """The discriminator values a union member answers to (its Literal fields)."""
    return tuple(v for f in model.model_fields.values()
                 if get_origin(f.annotation) is Literal for v in get_args(f.annotation))


def load_config(path: str | Path, overrides: Sequence[str | Path] = (),
                data_path: Optional[str | Path] = None) -> RunConfig:
    """Read and validate a YAML config; relative data paths resolve against it.

    Each file in ``overrides`` (e.g. ``configs/variants/listwise.yaml``) is a
    partial config deep-merged over it in order: mappings merge key by key,
    lists and scalars replace. ``data_path`` (a command line's ``--data-path``)
    replaces ``data.path``.
    """
    path = Path(path)
    raw = _read_yaml(path)
    sources = [str(path)]
    for extra in overrides:
        raw = deep_merge(raw, _read_yaml(Path(extra)))
        sources.append(str(extra))
    config = resolve_paths(parse_config(raw, " + ".join(sources)), path.parent)
    if data_path is not None:
        if not hasattr(config.data, "path"):
            raise ConfigError(f"--data-path given but data.kind={config.data.kind} has no path")
        config.data.path = str(Path(data_path).resolve())
    return config


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: dicts recursively, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    def fix(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    data = config.data
    if hasattr(data, "path"):
        data.path = fix(data.path)
    if isinstance(data, GenericData):
        for t in (data.interactions, data.users, data.items, data.ranking_log):
            if t is not None:
                t.path = fix(t.path)
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
