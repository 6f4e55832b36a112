"""A client for the served two-tower models, speaking TensorFlow Serving's API.

Depends only on the TF Serving protos (``tensorflow-serving-api``), ``grpc``,
numpy and the standard library (REST goes through ``urllib``), never on the
project's trainer/export/server code, so it works unchanged against a real
``tensorflow_model_server`` and against ``python -m serving``.

    with RetrievalClient("localhost:8500") as client:                 # gRPC
        client.recommend({"user_id": "u12", "age": 31, "favorite_genres": "Action|Drama"},
                         k=10, seen_item_ids=["i3", "i9"])
        # -> [Recommendation(item_id="i17", score=0.83), ...]

    RetrievalClient("http://localhost:8501", transport="rest")        # REST

    with TowerClient("localhost:8500", model_name="query_tower") as tower:
        tower.embed([{"user_id": "u12", ...}])                        # -> np.ndarray [n, d]

The input signature is fetched once (GetModelMetadata, or REST
``GET /v1/models/NAME[/versions/N|/labels/L]/metadata``) and used to check the
features before anything is sent and to convert values to the input dtypes.
Each call has a deadline (``timeout_s``, per attempt); UNAVAILABLE (HTTP 503,
or nothing listening) and RESOURCE_EXHAUSTED (HTTP 429: a full batching queue,
which upstream TF Serving answers UNAVAILABLE) are retried up to ``retries``
times with exponential backoff and full jitter. Other errors raise
:class:`ServingError` at once.
"""
from __future__ import annotations

import base64
import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, model_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

DEFAULT_SIGNATURE = "serving_default"
EXCLUDING_SIGNATURE = "retrieve_excluding"
SEEN_INPUT = "seen_item_ids"
MULTI_VALUE_SEPARATOR = "|"

# gRPC codes retried, and their HTTP equivalents (TF Serving's mapping).
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

_NUMPY = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64,
          types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64,
          types_pb2.DT_INT16: np.int16, types_pb2.DT_INT8: np.int8,
          types_pb2.DT_UINT8: np.uint8, types_pb2.DT_BOOL: np.bool_}
_VAL_FIELD = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
              types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val",
              types_pb2.DT_INT8: "int_val", types_pb2.DT_UINT8: "int_val",
              types_pb2.DT_INT64: "int64_val", types_pb2.DT_BOOL: "bool_val",
              types_pb2.DT_STRING: "string_val"}


class ClientError(Exception):
    """Base class of the errors this module raises."""


class FeatureError(ClientError, ValueError):
    """The request does not match the model's signature (raised before sending)."""


class ServingError(ClientError):
    """The server answered an error (or could not be reached).

    ``code`` is the gRPC status code name (``"NOT_FOUND"``, ``"UNAVAILABLE"``...;
    REST answers are mapped back from the HTTP status), ``attempts`` the number
    of tries made.
    """

    def __init__(self, code: str, message: str, attempts: int = 1):
        super().__init__(f"{code}: {message}" + (f" (after {attempts} attempts)"
                                                   if attempts > 1 else ""))
        self.code, self.message, self.attempts = code, message, attempts


class Recommendation(NamedTuple):
    item_id: str
    score: float


class InputSpec(NamedTuple):
    dtype: int            # types_pb2 enum
    shape: Optional[tuple]  # dims (-1 unknown), None for unknown rank


# --------------------------------------------------------------------------- tensors

def _to_str(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return MULTI_VALUE_SEPARATOR.join(str(v) for v in value).encode()
    return str(value).encode()


def _column(alias: str, values: Sequence[Any], dtype: int) -> np.ndarray:
    """Converts one feature's values to the signature dtype, naming the feature on error."""
    if dtype == types_pb2.DT_STRING:
        return np.array([b"" if v is None else _to_str(v) for v in values], dtype=object)
    if dtype not in _NUMPY:
        raise FeatureError(f"feature '{alias}': unsupported input dtype "
                           f"{types_pb2.DataType.Name(dtype)}")
    try:
        if dtype == types_pb2.DT_BOOL:
            return np.array([_bool(v) for v in values], dtype=np.bool_)
        if np.issubdtype(_NUMPY[dtype], np.floating):   # missing ("" / None): NaN = unknown
            return np.array([np.nan if v is None or v == "" else float(v) for v in values],
                            dtype=_NUMPY[dtype])
        return np.array([_int(v) for v in values], dtype=_NUMPY[dtype])
    except (TypeError, ValueError) as err:
        bad = next((v for v in values if not _is_number(v, dtype)), None)
        raise FeatureError(f"feature '{alias}' expects {types_pb2.DataType.Name(dtype)}, "
                           f"got {bad!r}") from err


def _int(v) -> int:
    """An integer value; 31.0 and "31" are, 31.7 is not (no silent truncation)."""
    if isinstance(v, (float, np.floating)) and not float(v).is_integer():
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


def _bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true"):
            return True
        if v.lower() in ("0", "false", ""):
            return False
        raise ValueError(f"{v!r} is not a boolean")
    return bool(v)


def _is_number(v, dtype) -> bool:
    try:
        if dtype == types_pb2.DT_BOOL:
            _bool(v)
            return True
        float(v) if np.issubdtype(_NUMPY[dtype], np.floating) else _int(v)
        return True
    except (TypeError, ValueError):
        return False


def make_tensor_proto(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """TensorProto with the typed ``*_val`` fields (what TF Serving itself writes)."""
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]))
    flat = array.reshape(-1)
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(_to_str(v) for v in flat)
    else:
        getattr(proto, _VAL_FIELD[dtype]).extend(flat.tolist())
    return proto


def tensor_to_array(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """numpy array from a TensorProto (typed fields or ``tensor_content``)."""
    shape = [d.size for d in proto.tensor_shape.dim]
    size = int(np.prod(shape)) if shape else 1
    if proto.dtype == types_pb2.DT_STRING:
        values = np.array(list(proto.string_val), dtype=object)
    elif proto.dtype in _NUMPY:
        np_dtype = _NUMPY[proto.dtype]
        if proto.tensor_content:
            values = np.frombuffer(proto.tensor_content, dtype=np_dtype).copy()
        else:
            values = np.array(getattr(proto, _VAL_FIELD[proto.dtype]), dtype=np_dtype)
    else:
        raise ClientError(f"unsupported output dtype {types_pb2.DataType.Name(proto.dtype)}")
    if values.size == 1 and size > 1:      # a repeated value may be written once
        values = np.repeat(values, size)
    if values.size != size:
        raise ClientError(f"output tensor has {values.size} values for shape {shape}")
    return values.reshape(shape)


# --------------------------------------------------------------------------- client

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
        self._signatures: Optional[dict] = None
        self._lock = threading.Lock()
        self._channel = self._stub = None
        if transport == "grpc":
            # reconnect quickly after UNAVAILABLE so that retries can reach a server
            # that has just come up (gRPC's default first reconnect backoff is 1 s)
            options = [("grpc.max_receive_message_length", 64 << 20),
                       ("grpc.max_send_message_length", 64 << 20),
                       ("grpc.initial_reconnect_backoff_ms", 100),
                       ("grpc.min_reconnect_backoff_ms", 100),
                       ("grpc.max_reconnect_backoff_ms", int(max_backoff_s * 1000) or 1000),
                       *(channel_options or [])]
            self._channel = grpc.insecure_channel(target, options=options)
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        else:
            url = target if "://" in target else f"http://{target}"
            self._base_url = url.rstrip("/")

    # ---- lifecycle
    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

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
        except (ValueError, ServingError) as err:   # FeatureError is a ValueError
            if isinstance(err, ServingError) and err.code not in ("INVALID_ARGUMENT",
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
        if self.transport == "grpc":
            req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._fill_spec(req.model_spec)
            resp = self._call(lambda t: self._stub.GetModelMetadata(req, timeout=t))
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            resp.metadata["signature_def"].Unpack(sig_map)
        else:
            body = self._call(lambda t: self._http("GET", self._model_path() + "/metadata",
                                                   None, t))
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
        columns = {alias: _column(alias, [row[alias] for row in rows], spec[alias].dtype)
                   for alias in sorted(wanted)}
        columns.update(extra)
        return columns

    def predict(self, inputs: Mapping[str, np.ndarray],
                signature_name: str = DEFAULT_SIGNATURE,
                output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """One Predict call with ready columns; returns {output alias: array}."""
        spec = self.input_spec(signature_name)
        if self.transport == "grpc":
            req = predict_pb2.PredictRequest()
            self._fill_spec(req.model_spec)
            req.model_spec.signature_name = signature_name
            for alias, arr in inputs.items():
                req.inputs[alias].CopyFrom(make_tensor_proto(np.asarray(arr), spec[alias].dtype))
            req.output_filter.extend(output_filter)
            resp = self._call(lambda t: self._stub.Predict(req, timeout=t))
            self.last_model_version = (resp.model_spec.version.value
                                       if resp.model_spec.HasField("version") else None)
            return {alias: tensor_to_array(t) for alias, t in resp.outputs.items()}
        body = {"signature_name": signature_name,
                "inputs": {alias: _json_values(np.asarray(arr)) for alias, arr in inputs.items()}}
        payload = json.dumps(body).encode()
        resp = self._call(lambda t: self._http("POST", self._model_path() + ":predict",
                                               payload, t))
        outputs = resp["outputs"]
        if not isinstance(outputs, dict):   # a single output comes back unnamed
            (alias,) = self.output_spec(signature_name) or ("output",)
            outputs = {alias: outputs}
        out_spec = self.output_spec(signature_name)
        result = {}
        for alias, value in outputs.items():
            if alias in out_spec and out_spec[alias].dtype == types_pb2.DT_STRING:
                result[alias] = np.array(_json_strings(value), dtype=object)
            else:
                dtype = _NUMPY.get(out_spec[alias].dtype) if alias in out_spec else None
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

    def _http(self, method: str, path: str, data: Optional[bytes], timeout: float):
        req = urllib.request.Request(self._base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
            try:
                return json.loads(body)
            except ValueError as err:   # not JSON (or not UTF-8): not TF Serving's answer
                raise _Failure("INTERNAL", f"{self._base_url}{path} answered a body that "
                                           f"is not JSON ({err})") from None
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text
            raise _Failure(_HTTP_TO_CODE.get(err.code, "INTERNAL"),
                           f"HTTP {err.code}: {message}") from None
        except http.client.HTTPException as err:   # e.g. IncompleteRead: connection cut
            raise _Failure("UNAVAILABLE", f"{self._base_url}{path}: {err!r}") from None
        except (TimeoutError, ConnectionError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise _Failure("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s") from None
            raise _Failure("UNAVAILABLE", f"cannot reach {self._base_url}: {reason}") from None

    def _call(self, attempt_fn):
        """Runs ``attempt_fn(timeout)``, retrying retryable failures with backoff."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt_fn(self.timeout_s)
            except grpc.RpcError as err:
                code, message = err.code().name, err.details() or ""
            except _Failure as err:
                code, message = err.code, err.message
            if not _retryable(code, message) or attempts > self.retries:
                raise ServingError(code, message, attempts) from None
            delay = min(self.max_backoff_s, self.backoff_s * (2 ** (attempts - 1)))
            time.sleep(random.uniform(0, delay))   # full jitter


def _retryable(code: str, message: str) -> bool:
    """UNAVAILABLE, or RESOURCE_EXHAUSTED from a full batch queue; not a message
    over gRPC's size limit (also RESOURCE_EXHAUSTED), which fails every time."""
    return code in RETRYABLE_CODES and "larger than max" not in message


class _Failure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _json_values(arr: np.ndarray):
    if arr.dtype == object:
        def conv(v):
            b = v if isinstance(v, bytes) else str(v).encode()
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(b).decode()}
        return np.vectorize(conv, otypes=[object])(arr).tolist() if arr.size else arr.tolist()
    return arr.tolist()


def _json_strings(value):
    if isinstance(value, list):
        return [_json_strings(v) for v in value]
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    return value.encode() if isinstance(value, str) else value


def _pad_seen(seen: Sequence[Iterable[str]]) -> np.ndarray:
    """[rows, width] seen ids padded with "", and always "" at [0, 0].

    TF Serving's server-side batching pads each request's narrower
    ``seen_item_ids`` with that request's first element: it must be "" or
    the other users of a merged batch would lose that item too. Row 0's ids
    therefore start one column in (order does not matter for exclusion).
    """
    lists = [[_to_str(s) for s in row] if row is not None else [] for row in seen]
    width = max(1, max((len(r) for r in lists), default=0))
    if lists and lists[0] and b"" not in lists[0] and len(lists[0]) >= width:
        width += 1
    out = np.full((len(lists), width), b"", dtype=object)
    for i, row in enumerate(lists):
        start = 1 if i == 0 and b"" not in row else 0
        out[i, start:start + len(row)] = row
    return out


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
            extra = {SEEN_INPUT: _pad_seen(seen_item_ids)}
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


__all__ = ["RetrievalClient", "TowerClient", "ServingClient", "Recommendation", "embed",
           "ClientError", "FeatureError", "ServingError", "make_tensor_proto",
           "tensor_to_array"]
