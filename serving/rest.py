"""TF Serving's REST API on aiohttp, in its own thread and event loop.

Routes (http_rest_api_util.cc): ``POST /v1/models/NAME[/versions/N|/labels/L]:predict``
(``:classify``/``:regress`` answer 501), ``GET /v1/models/NAME[...]`` (status) and
``GET .../metadata``; anything else under ``/v1/`` is 400 "Malformed request".
The loop only reads bodies (refusing one over the size cap as soon as it is
known: from its Content-Length, or while a chunked body streams in); parsing
and predicting run on worker threads, so the loop stays free.  A client that
half-closes its socket after the body (HTTP/1.0 style) still gets its answer,
and malformed HTTP gets a JSON error like every other failure.  When
monitoring is enabled the Prometheus text is served at its configured path.
"""
import json
import logging
import re
import time
from typing import Optional
from urllib.parse import unquote

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

from serving import json_tensor
from serving.errors import ServingError, from_exception, invalid_argument, unimplemented
from serving.limits import RequestLimits
from serving.loop_thread import BlockingRunner, LoopThreadServer
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.predict import DEFAULT_SIGNATURE, SIGNATURE_DEF_FIELD, status_response

log = logging.getLogger(__name__)

PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
    r":(classify|regress|predict)", re.IGNORECASE)
STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE)
JSON_HEADERS = {"Content-Type": "application/json"}


def _proto_json(message) -> bytes:
    return json.dumps(json_format.MessageToDict(
        message, preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True), indent=1).encode()


def _model_spec(name, version, label) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=unquote(name or ""))
    if version:
        try:
            spec.version.value = int(version)
        except ValueError:
            raise invalid_argument(f"Failed to convert version: {version} to numeric.")
    if label:
        spec.version_label = unquote(label)
    return spec


class RestHandler:
    """Maps (method, path, body) to (http status, JSON body); knows no aiohttp."""

    def __init__(self, predictor, manager, metrics=None, monitoring_path: Optional[str] = None):
        self._predictor = predictor
        self._manager = manager
        self._metrics = metrics
        self._monitoring_path = monitoring_path

    def handle(self, method: str, path: str, body: bytes):
        """Returns (status, content_type, body bytes)."""
        if self._monitoring_path and method == "GET" and path == self._monitoring_path:
            return 200, METRICS_CONTENT_TYPE, self._metrics.exposition()
        started = time.monotonic()
        model_name, api, status = "", "", "OK"
        try:
            match = PREDICT_RE.fullmatch(path) if method == "POST" else \
                STATUS_RE.fullmatch(path) if method == "GET" else None
            if match is None:
                raise invalid_argument(f"Malformed request: {method} {path}")
            name, version, label, verb = match.groups()
            model_name = unquote(name or "")
            if method == "POST":
                api = verb
                if verb != "predict":
                    if verb in ("classify", "regress"):
                        raise unimplemented(
                            f"{verb} is not supported by this server; use :predict.")
                    raise invalid_argument(f"Malformed request: {method} {path}")
                out = self._predict(_model_spec(name, version, label), body)
            elif verb:
                api = "GetModelMetadata"
                if verb != "metadata":
                    raise invalid_argument(f"Malformed request: {method} {path}")
                out = self._metadata(_model_spec(name, version, label))
            else:
                api = "GetModelStatus"
                if not name:
                    raise invalid_argument("Missing model name in request.")
                out = _proto_json(status_response(self._manager,
                                                  _model_spec(name, version, label)))
            return 200, "application/json", out
        except Exception as exc:  # noqa: BLE001 - the server never dies on a request
            err = from_exception(exc)
            if not isinstance(exc, ServingError):
                log.exception("REST %s %s failed", method, path)
            status = err.code_name
            return err.http_status, "application/json", json_tensor.error_json(err.message)
        finally:
            if self._metrics is not None and api == "predict":
                self._metrics.record_request(model_name, "Predict", "REST", status,
                                             time.monotonic() - started)

    def _predict(self, model_spec, body: bytes) -> bytes:
        predictor = self._predictor
        doc = json_tensor.parse_body(body, predictor.limits)
        sig_name = json_tensor.signature_name(doc)
        with predictor.servable(model_spec) as servable:
            key = sig_name or DEFAULT_SIGNATURE
            signature = servable.signatures.get(key)
            if signature is None:
                raise invalid_argument(
                    f"Serving signature name: \"{key}\" not found in signature def")
            arrays, fmt = json_tensor.request_arrays(doc, signature, predictor.limits)
            del doc   # the parsed JSON can be far larger than the arrays
            values = predictor.run(servable, predictor.prepare_arrays(signature, arrays))
        return json_tensor.response_json(values, fmt)

    def _metadata(self, model_spec) -> bytes:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_spec, metadata_field=[SIGNATURE_DEF_FIELD])
        response = self._predictor.metadata(request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(sig_map)
        doc = {
            "model_spec": json_format.MessageToDict(
                response.model_spec, preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True),
            "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(
                sig_map, preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True)},
        }
        return json.dumps(doc, indent=1).encode()


def _error_response(status: int, message: str) -> web.Response:
    """An error answered on the loop; the connection closes (its body may be unread)."""
    response = web.Response(status=status, headers=JSON_HEADERS,
                            body=json_tensor.error_json(message))
    response.force_close()
    return response


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with two changes.

    A client that half-closes after sending its request (HTTP/1.0: body, then
    EOF) keeps the socket open for the answer (aiohttp would drop the
    connection and answer nothing).  HTTP-level errors (malformed requests)
    are answered with a JSON ``{"error": ...}`` body like every other error;
    an HTTP/1.0 POST without Content-Length, whose body aiohttp cannot
    delimit, gets 411 Length Required.
    """

    def eof_received(self) -> bool:
        self.close()   # no request can follow: close once the last one is answered
        if self._parser is not None:
            try:
                self._parser.feed_eof()
            except HttpProcessingError as exc:   # a body cut short fails, not waits
                payloads = [payload for _, payload in self._messages]
                if self._current_request is not None:
                    payloads.append(self._current_request.content)
                for payload in payloads:
                    payload.set_exception(exc)
        return True    # keep the write side open for the answer

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        if status == 500:
            log.error("REST request failed", exc_info=exc)
            message = "Internal error"
        elif "after `Connection: close`" in str(message):
            status, message = 411, ("Length Required: an HTTP/1.0 request with a body "
                                    "needs a Content-Length header")
        return _error_response(
            status, f"Malformed request: {message}" if status == 400 else str(message))


class _Server(web.Server):
    """aiohttp's low-level server, with :class:`_RequestHandler` connections."""

    def __call__(self) -> _RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class RestServer(LoopThreadServer):
    """Runs an aiohttp server for a RestHandler on a background thread."""

    thread_name = "rest-server"

    def __init__(self, handler: RestHandler, host: str, port: int,
                 limits: Optional[RequestLimits] = None, workers: int = 16,
                 event_loop: str = "auto", shutdown_timeout: float = 30.0):
        super().__init__(event_loop)
        self._shutdown_timeout = shutdown_timeout   # in-flight requests' time to finish
        self._handler = handler
        self._host, self._port = host, port
        self._limits = limits or RequestLimits()
        self._workers = BlockingRunner(workers, name="rest")
        self._runner = None

    async def _dispatch(self, request: web.BaseRequest) -> web.Response:
        path = request.raw_path.split("?", 1)[0]
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        status, ctype, out = await self._workers.call(
            self._handler.handle, request.method, path, body)
        return web.Response(status=status, body=out, headers={"Content-Type": ctype})

    async def _read_body(self, request: web.BaseRequest):
        """The body, or the error response: over the cap before reading it
        (Content-Length) or as soon as a chunked body passes it."""
        cap = self._limits.max_request_bytes
        length = request.content_length
        if length is not None and length > cap:
            return self._too_large(length)
        parts, size = [], 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > cap:
                    return self._too_large(length)
                parts.append(chunk)
        except HttpProcessingError as exc:   # the client ended the body early
            return _error_response(400, f"Malformed request: {exc.message}")
        return b"".join(parts)

    def _too_large(self, length: Optional[int]) -> web.Response:
        return _error_response(400, self._limits.body_too_large(length))

    async def _start(self):
        server = _Server(self._dispatch, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()

    async def _cleanup(self):
        await self._runner.cleanup()

    def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish, then stops the loop."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self._shutdown_timeout + 10)
        self._workers.stop()
