"""The clients: one served model each, its signature fetched once and used to
check and convert features before anything is sent."""
from __future__ import annotations

import json
import threading
import urllib.parse
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2

from serving.client.errors import ClientError, FeatureError, ServerError
from serving.client.tensors import (InputSpec, feature_column, json_strings, json_values,
                                    make_tensor_proto, numpy_dtype, pad_seen_ids,
                                    tensor_to_array)
from serving.client.transport import GrpcTransport, RestTransport, RetryPolicy

DEFAULT_SIGNATURE = "serving_default"
EXCLUDING_SIGNATURE = "retrieve_excluding"
SEEN_INPUT = "seen_item_ids"


class Recommendation(NamedTuple):
    item_id: str
    score: float


class ServingClient:
    """Generic Predict client for one served model (gRPC or REST)."""

    def __init__(self, target: str, model_name: str, transport: str = "grpc",
                 timeout_s: float = 10.0, retries: int = 3, version: Optional[int] = None,
                 version_label: Optional[str] = None, backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0,
                 channel_options: Optional[Sequence[tuple]] = None):
        if transport not in ("grpc", "rest"):
            raise ValueError(f"transport must be 'grpc' or 'rest', got {transport!r}")
        if version is not None and version_label is not None:
            raise ValueError("give either version or version_label, not both")
        if not model_name:
            raise ValueError("model_name is required")
        if retries < 0 or timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")
        self.target, self.model_name, self.transport = target, model_name, transport
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.version, self.version_label = version, version_label
        self.last_model_version: Optional[int] = None   # version that answered (gRPC)
        self._signatures: Optional[tuple] = None
        self._lock = threading.Lock()
        policy = RetryPolicy(self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s)
        self._grpc: Optional[GrpcTransport] = None
        self._rest: Optional[RestTransport] = None
        if transport == "grpc":
            self._grpc = GrpcTransport(target, policy, channel_options)
        else:
            self._rest = RestTransport(target, policy)

    # ---- lifecycle
    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- signature
    def signatures(self) -> dict[str, dict[str, InputSpec]]:
        """{signature name: {input alias: InputSpec}}, fetched once from the server."""
        return self._metadata()[0]

    def output_spec(self, signature_name: str = DEFAULT_SIGNATURE) -> dict[str, InputSpec]:
        """{output alias: InputSpec} of a signature (empty if unknown)."""
        return self._metadata()[1].get(signature_name, {})

    def input_spec(self, signature_name: str = DEFAULT_SIGNATURE) -> dict[str, InputSpec]:
        sigs = self.signatures()
        if signature_name not in sigs:
            raise ClientError(f"model '{self.model_name}' has no signature "
                              f"'{signature_name}' (it has {sorted(sigs)})")
        return sigs[signature_name]

    def feature_names(self, signature_name: str = DEFAULT_SIGNATURE) -> list[str]:
        """The raw feature inputs of a signature (``seen_item_ids`` excluded)."""
        return sorted(a for a in self.input_spec(signature_name) if a != SEEN_INPUT)

    def refresh(self) -> None:
        """Forgets the cached signatures; the next call fetches them again."""
        with self._lock:
            self._signatures = None

    def _fresh(self, fn):
        """``fn()``; when the cached signature or the server rejects the request,
        fetch the signatures again and, if a new model version changed them
        (inputs, k), retry once with them."""
        try:
            return fn()
        except (ValueError, ServerError) as err:   # FeatureError is a ValueError
            if isinstance(err, ServerError) and err.code not in ("INVALID_ARGUMENT",
                                                                 "FAILED_PRECONDITION"):
                raise
            stale = self._signatures
            self.refresh()
            try:
                fresh = self._metadata()
            except ClientError:
                raise err from None
            if fresh == stale:
                raise
        return fn()

    def _metadata(self) -> tuple[dict, dict]:
        with self._lock:
            if self._signatures is None:
                self._signatures = self._fetch_signatures()
            return self._signatures

    def _fetch_signatures(self) -> tuple[dict, dict]:
        if self._grpc is not None:
            req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._fill_spec(req.model_spec)
            resp = self._grpc.metadata(req)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            resp.metadata["signature_def"].Unpack(sig_map)
        else:
            body = self._rest.get(self._model_path() + "/metadata")
            sig_map = json_format.ParseDict(body["metadata"]["signature_def"],
                                            get_model_metadata_pb2.SignatureDefMap(),
                                            ignore_unknown_fields=True)

        def specs(infos):
            return {alias: InputSpec(info.dtype, None if info.tensor_shape.unknown_rank else
                                     tuple(d.size for d in info.tensor_shape.dim))
                    for alias, info in infos.items()}

        return ({n: specs(sig.inputs) for n, sig in sig_map.signature_def.items()},
                {n: specs(sig.outputs) for n, sig in sig_map.signature_def.items()})

    # ---- requests
    def build_inputs(self, rows: Sequence[Mapping[str, Any]],
                     signature_name: str = DEFAULT_SIGNATURE,
                     extra: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
        """Columns for a signature from rows of raw features; checks names first."""
        if not rows:
            raise FeatureError("no examples given")
        spec = self.input_spec(signature_name)
        extra = extra or {}
        wanted = set(spec) - set(extra)
        for i, row in enumerate(rows):
            keys = set(row)
            missing, unknown = sorted(wanted - keys), sorted(keys - wanted)
            if missing or unknown:
                where = f" (example {i})" if len(rows) > 1 else ""
                parts = []
                if missing:
                    parts.append(f"missing feature(s) {missing}")
                if unknown:
                    parts.append(f"unknown feature(s) {unknown}")
                raise FeatureError(f"{'; '.join(parts)}{where} for model "
                                   f"'{self.model_name}' signature '{signature_name}', "
                                   f"which takes {sorted(wanted)}")
        columns = {alias: feature_column(alias, [row[alias] for row in rows],
                                         spec[alias].dtype)
                   for alias in sorted(wanted)}
        columns.update(extra)
        return columns

    def predict(self, inputs: Mapping[str, np.ndarray],
                signature_name: str = DEFAULT_SIGNATURE,
                output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """One Predict call with ready columns; returns {output alias: array}."""
        spec = self.input_spec(signature_name)
        if self._grpc is not None:
            req = predict_pb2.PredictRequest()
            self._fill_spec(req.model_spec)
            req.model_spec.signature_name = signature_name
            for alias, arr in inputs.items():
                req.inputs[alias].CopyFrom(
                    make_tensor_proto(np.asarray(arr), spec[alias].dtype))
            req.output_filter.extend(output_filter)
            resp = self._grpc.predict(req)
            self.last_model_version = (resp.model_spec.version.value
                                       if resp.model_spec.HasField("version") else None)
            return {alias: tensor_to_array(t) for alias, t in resp.outputs.items()}
        body = {"signature_name": signature_name,
                "inputs": {alias: json_values(np.asarray(arr)) for alias, arr in inputs.items()}}
        resp = self._rest.post(self._model_path() + ":predict", json.dumps(body).encode())
        outputs = resp["outputs"]
        if not isinstance(outputs, dict):   # a single output comes back unnamed
            (alias,) = self.output_spec(signature_name) or ("output",)
            outputs = {alias: outputs}
        out_spec = self.output_spec(signature_name)
        result = {}
        for alias, value in outputs.items():
            if alias in out_spec and out_spec[alias].dtype == types_pb2.DT_STRING:
                result[alias] = np.array(json_strings(value), dtype=object)
            else:
                dtype = numpy_dtype(out_spec[alias].dtype) if alias in out_spec else None
                result[alias] = np.array(value, dtype=dtype)
        return result

    def _fill_spec(self, spec: model_pb2.ModelSpec) -> None:
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = int(self.version)
        elif self.version_label is not None:
            spec.version_label = self.version_label

    def _model_path(self) -> str:
        path = f"/v1/models/{urllib.parse.quote(self.model_name, safe='')}"
        if self.version is not None:
            path += f"/versions/{int(self.version)}"
        elif self.version_label is not None:
            path += f"/labels/{urllib.parse.quote(self.version_label, safe='')}"
        return path


class RetrievalClient(ServingClient):
    """Top-k retrieval from the ``retrieval`` / ``retrieval_exact`` models."""

    def __init__(self, target: str, model_name: str = "retrieval", transport: str = "grpc",
                 timeout_s: float = 10.0, retries: int = 3, version: Optional[int] = None,
                 version_label: Optional[str] = None, **kwargs):
        super().__init__(target, model_name, transport, timeout_s, retries, version,
                         version_label, **kwargs)

    def recommend(self, user_features: Mapping[str, Any], k: Optional[int] = None,
                  seen_item_ids: Optional[Iterable[str]] = None) -> list[Recommendation]:
        """Ranked (item_id, score) for one user; ``seen_item_ids`` are excluded."""
        seen = None if seen_item_ids is None else [list(seen_item_ids)]
        return self.recommend_batch([user_features], k=k, seen_item_ids=seen)[0]

    def recommend_batch(self, users: Sequence[Mapping[str, Any]], k: Optional[int] = None,
                        seen_item_ids: Optional[Sequence[Iterable[str]]] = None
                        ) -> list[list[Recommendation]]:
        """One Predict for several users; ``seen_item_ids``: one list per user (ragged ok).
        A request the model's signature rejects is retried once with freshly fetched
        signatures when a new version changed them."""
        users = list(users)
        seen = None if seen_item_ids is None else list(seen_item_ids)
        return self._fresh(lambda: self._recommend_batch(users, k, seen))

    def _recommend_batch(self, users, k, seen_item_ids) -> list[list[Recommendation]]:
        if k is not None and k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if seen_item_ids is None:
            signature, extra = DEFAULT_SIGNATURE, None
        else:
            if len(seen_item_ids) != len(users):
                raise FeatureError(f"seen_item_ids has {len(seen_item_ids)} lists for "
                                   f"{len(users)} users")
            signature = EXCLUDING_SIGNATURE
            if SEEN_INPUT not in self.input_spec(signature):
                raise ClientError(f"signature '{signature}' of model '{self.model_name}' "
                                  f"has no '{SEEN_INPUT}' input")
            extra = {SEEN_INPUT: pad_seen_ids(seen_item_ids)}
        width = (self.output_spec(signature).get("scores") or InputSpec(0, None)).shape
        served_k = width[1] if width and len(width) == 2 and width[1] > 0 else None
        if k is not None and served_k is not None and k > served_k:
            raise ValueError(f"k={k} is more than model '{self.model_name}' returns "
                             f"({served_k}); export it with a larger k")
        inputs = self.build_inputs(users, signature, extra)
        out = self.predict(inputs, signature, output_filter=("item_ids", "scores"))
        results = []
        for ids, scores in zip(out["item_ids"], out["scores"]):
            row = [Recommendation(i.decode() if isinstance(i, bytes) else str(i), float(s))
                   for i, s in zip(ids, scores) if i not in (b"", "")]
            results.append(row[:k] if k is not None else row)
        return results


class TowerClient(ServingClient):
    """Embeddings from the ``query_tower`` / ``candidate_tower`` models."""

    def __init__(self, target: str, model_name: str = "query_tower", **kwargs):
        super().__init__(target, model_name, **kwargs)

    def embed(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """[n, d] float32 embeddings for raw feature rows (one dict gives n = 1)."""
        rows = [rows] if isinstance(rows, Mapping) else list(rows)
        out = self._fresh(lambda: self.predict(self.build_inputs(rows), DEFAULT_SIGNATURE,
                                               ("embedding",)))
        return np.asarray(out["embedding"], dtype=np.float32)


def embed(target: str, rows, model_name: str = "query_tower", **kwargs) -> np.ndarray:
    """One-shot helper: ``TowerClient(target, model_name, **kwargs).embed(rows)``."""
    with TowerClient(target, model_name, **kwargs) as client:
        return client.embed(rows)
