"""Getting a call to TF Serving and its answer back: gRPC stubs or REST over
``urllib``, a deadline per attempt, and retries with exponential backoff and
full jitter for UNAVAILABLE (HTTP 503, or nothing listening) and
RESOURCE_EXHAUSTED (HTTP 429: a full batching queue, which upstream TF
Serving answers UNAVAILABLE).  Other failures raise :class:`ServerError` at once."""
import http.client
import json
import random
import time
import urllib.error
import urllib.request
from typing import Any, Callable, NamedTuple, Optional, Sequence

import grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving.client.errors import ServerError

# gRPC codes retried, and their HTTP equivalents (TF Serving's mapping).
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def retryable(code: str, message: str) -> bool:
    """UNAVAILABLE, or RESOURCE_EXHAUSTED from a full batch queue; not a message
    over gRPC's size limit (also RESOURCE_EXHAUSTED), which fails every time."""
    return code in RETRYABLE_CODES and "larger than max" not in message


class CallFailed(Exception):
    """One REST attempt failed with a gRPC code name (internal to this module)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class RetryPolicy(NamedTuple):
    timeout_s: float = 10.0      # deadline of each attempt
    retries: int = 3             # attempts after the first
    backoff_s: float = 0.1       # first backoff; doubles, up to max_backoff_s
    max_backoff_s: float = 2.0

    def call(self, attempt_fn: Callable[[float], Any]):
        """Runs ``attempt_fn(timeout_s)``, retrying retryable failures with backoff."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt_fn(self.timeout_s)
            except grpc.RpcError as err:
                code, message = err.code().name, err.details() or ""
            except CallFailed as err:
                code, message = err.code, err.message
            if not retryable(code, message) or attempts > self.retries:
                raise ServerError(code, message, attempts) from None
            delay = min(self.max_backoff_s, self.backoff_s * (2 ** (attempts - 1)))
            time.sleep(random.uniform(0, delay))   # full jitter


class GrpcTransport:
    """PredictionService calls on one channel."""

    def __init__(self, target: str, policy: RetryPolicy,
                 channel_options: Optional[Sequence[tuple]] = None):
        self.policy = policy
        # reconnect quickly after UNAVAILABLE so that retries can reach a server
        # that has just come up (gRPC's default first reconnect backoff is 1 s)
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", int(policy.max_backoff_s * 1000) or 1000),
                   *(channel_options or [])]
        self._channel: Optional[grpc.Channel] = grpc.insecure_channel(target, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
                 ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return self.policy.call(lambda t: self._stub.GetModelMetadata(request, timeout=t))

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        return self.policy.call(lambda t: self._stub.Predict(request, timeout=t))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class RestTransport:
    """JSON calls to TF Serving's REST API (``http://host:port``)."""

    def __init__(self, target: str, policy: RetryPolicy):
        self.policy = policy
        url = target if "://" in target else f"http://{target}"
        self.base_url = url.rstrip("/")

    def get(self, path: str):
        return self.policy.call(lambda t: self._request("GET", path, None, t))

    def post(self, path: str, payload: bytes):
        return self.policy.call(lambda t: self._request("POST", path, payload, t))

    def close(self) -> None:
        """Nothing held between calls."""

    def _request(self, method: str, path: str, data: Optional[bytes], timeout: float):
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
            try:
                return json.loads(body)
            except ValueError as err:   # not JSON (or not UTF-8): not TF Serving's answer
                raise CallFailed("INTERNAL", f"{self.base_url}{path} answered a body that "
                                             f"is not JSON ({err})") from None
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text
            raise CallFailed(HTTP_TO_CODE.get(err.code, "INTERNAL"),
                             f"HTTP {err.code}: {message}") from None
        except http.client.HTTPException as err:   # e.g. IncompleteRead: connection cut
            raise CallFailed("UNAVAILABLE", f"{self.base_url}{path}: {err!r}") from None
        except (TimeoutError, ConnectionError, urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise CallFailed("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s") \
                    from None
            raise CallFailed("UNAVAILABLE", f"cannot reach {self.base_url}: {reason}") from None
