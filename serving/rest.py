"""TF Serving's REST API on aiohttp, in its own thread and event loop.

Routes (http_rest_api_util.cc): ``POST /v1/models/NAME[/versions/N|/labels/L]:predict``
(``:classify``/``:regress`` answer 501), ``GET /v1/models/NAME[...]`` (status) and
``GET .../metadata``; anything else under ``/v1/`` is 400 "Malformed request".
The blocking work runs on a thread pool so the loop stays free.  When
monitoring is enabled the Prometheus text is served at its configured path.
"""
import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

from serving import json_tensor
from serving.errors import ServingError, from_exception, invalid_argument, unimplemented
from serving.grpc_service import status_response
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.predict import SIGNATURE_DEF_FIELD
from serving.loop_thread import LoopThreadServer

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

    def __init__(self, predictor, manager, metrics=None, monitoring_path=None):
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
        doc = json_tensor.parse_body(body)
        sig_name = json_tensor.signature_name(doc)
        with self._predictor.servable(model_spec) as servable:
            key = sig_name or "serving_default"
            signature = servable.signatures.get(key)
            if signature is None:
                raise invalid_argument(
                    f"Serving signature name: \"{key}\" not found in signature def")
            arrays, fmt = json_tensor.request_arrays(doc, signature)
            signature.check_aliases(arrays.keys())
            for alias, arr in arrays.items():
                signature.check_tensor(alias, signature.inputs[alias].dtype, arr.shape)
            outputs = signature.resolve_outputs(())
            values = self._predictor.run(servable, signature, arrays, outputs)
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


class RestServer(LoopThreadServer):
    """Runs an aiohttp server for a RestHandler on a background thread."""

    thread_name = "rest-server"

    def __init__(self, handler: RestHandler, host: str, port: int, max_body_bytes: int,
                 workers: int = 16, event_loop: str = "auto",
                 shutdown_timeout: float = 30.0):
        super().__init__(event_loop)
        self._shutdown_timeout = shutdown_timeout   # in-flight requests' time to finish
        self._handler = handler
        self._host, self._port = host, port
        self._max_body = max_body_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rest")
        self._runner = None

    async def _dispatch(self, request: web.Request) -> web.Response:
        path = request.raw_path.split("?", 1)[0]
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._too_large(length)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(length)
        loop = asyncio.get_running_loop()
        status, ctype, out = await loop.run_in_executor(
            self._pool, self._handler.handle, request.method, path, body)
        return web.Response(status=status, body=out, headers={"Content-Type": ctype})

    def _too_large(self, length) -> web.Response:
        msg = (f"Request body of {length if length is not None else 'more than'} bytes "
               f"exceeds the limit of {self._max_body} bytes")
        return web.Response(status=400, body=json_tensor.error_json(msg), headers=JSON_HEADERS)

    async def _start(self):
        app = web.Application(client_max_size=self._max_body)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None,
                                   shutdown_timeout=self._shutdown_timeout)
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
        self._pool.shutdown(wait=True)
