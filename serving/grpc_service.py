"""TF Serving's gRPC services (PredictionService, ModelService) over grpc.aio.

Every handler catches everything: a ServingError becomes its status code, any
other exception INTERNAL, so no request can take the server down.  Handlers
run on the server's event loop and never block it: session runs and config
reloads go to worker threads.
"""
import logging
import time

from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving.errors import ServingError, from_exception, invalid_argument, unimplemented
from serving.predict import status_response

log = logging.getLogger(__name__)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata on a ``grpc.aio`` server.

    Decoding, validation and response building run on the event loop; the
    session runs on a batch worker (batching) or on ``runner``'s threads.
    Classify/Regress/MultiInference are UNIMPLEMENTED.
    """

    def __init__(self, predictor, runner, metrics=None):
        self._predictor = predictor
        self._runner = runner
        self._metrics = metrics
        self._predicts = 0   # Predict calls in flight (touched on the loop only)
        self._draining = False

    def begin_drain(self) -> None:
        """Shutting down: no more session runs on the loop, which must stay free
        to pick up the calls gRPC has already received."""
        self._draining = True

    @property
    def predicts_in_flight(self) -> int:
        return self._predicts

    async def _call(self, api: str, request, context, coro_fn, record: bool = True):
        """Runs ``coro_fn(request)``; errors become their status.  ``record``:
        count it in the request metrics (TF Serving counts Predict, Classify
        and Regress, not GetModelMetadata)."""
        started = time.monotonic()
        status = "OK"
        err = None
        try:
            return await coro_fn(request)
        except Exception as exc:  # noqa: BLE001 - the server never dies on a request
            err = from_exception(exc)
            if not isinstance(exc, ServingError):
                log.exception("%s failed", api)
            status = err.code_name
        finally:
            if record and self._metrics is not None:
                name = request.model_spec.name if request.HasField("model_spec") else ""
                self._metrics.record_request(name, api, "GRPC", status,
                                             time.monotonic() - started)
        await context.abort(err.code, err.message)

    async def Predict(self, request, context):
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        predictor, runner = self._predictor, self._runner
        # The only request in flight runs a small session (INLINE_MAX_ROWS) on
        # the loop thread: no one waits behind it, and it saves the hand-off
        # to a runner thread.  Anything larger runs on a runner thread.
        self._predicts += 1
        try:
            inline = self._predicts == 1 and not self._draining
            return await self._call(
                "Predict", request, context,
                lambda r: predictor.predict_async(r, deadline, runner, inline))
        finally:
            self._predicts -= 1

    async def GetModelMetadata(self, request, context):
        async def metadata(r):
            return self._predictor.metadata(r)
        return await self._call("GetModelMetadata", request, context, metadata, record=False)

    async def _unimplemented(self, api, request, context):
        async def fail(_):
            raise unimplemented(
                f"{api} is not supported by this server: serve a predict signature "
                "and use Predict (the project's models have no classify/regress "
                "signatures).")
        return await self._call(api, request, context, fail)

    async def Classify(self, request, context):
        return await self._unimplemented("Classify", request, context)

    async def Regress(self, request, context):
        return await self._unimplemented("Regress", request, context)

    async def MultiInference(self, request, context):
        err = unimplemented("MultiInference is not supported by this server; use Predict.")
        await context.abort(err.code, err.message)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest (which waits for the loads
    on ``runner``'s threads, never on the event loop)."""

    def __init__(self, manager, reload_fn, runner):
        self._manager = manager
        self._reload_fn = reload_fn
        self._runner = runner

    async def GetModelStatus(self, request, context):
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            return status_response(self._manager, request.model_spec)
        except Exception as exc:  # noqa: BLE001
            err = from_exception(exc)
        await context.abort(err.code, err.message)

    async def HandleReloadConfigRequest(self, request, context):
        try:
            config = request.config
            if config.WhichOneof("config") != "model_config_list":
                raise invalid_argument(
                    "ServerConfig must contain a model_config_list (custom_model_config "
                    "is not supported)")
            await self._runner.call(self._reload_fn, config.model_config_list)
            response = model_management_pb2.ReloadConfigResponse()
            response.status.error_code = 0
            return response
        except Exception as exc:  # noqa: BLE001
            err = from_exception(exc)
        await context.abort(err.code, err.message)


def add_services(server, predictor, manager, reload_fn, runner,
                 metrics=None) -> PredictionService:
    """Registers both services; returns the PredictionService (drained on shutdown)."""
    prediction = PredictionService(predictor, runner, metrics)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(manager, reload_fn, runner), server)
    return prediction
