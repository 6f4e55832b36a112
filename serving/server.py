"""Wires manager, predictor, batching, gRPC, REST and metrics into one server.

``ModelServer.start()`` applies the model config, waits for the models to
become AVAILABLE (or fail), then opens the gRPC and REST ports; ``stop()``
stops accepting, finishes in-flight requests and unloads everything.
"""
import logging
import os
import asyncio
import threading
from dataclasses import dataclass

import grpc

from serving import config as config_io
from serving.batching import BatchingOptions, BatchScheduler
from serving.errors import ServingError
from serving.grpc_service import add_services
from serving.limits import RequestLimits
from serving.loop_thread import BlockingRunner, LoopThreadServer
from serving.manager import ServableManager
from serving.metrics import Metrics
from serving.predict import Predictor
from serving.rest import RestHandler, RestServer
from serving.servable import Servable, session_config
from serving.warmup import run_warmup

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int = 8501
    model_server_config: object = None       # ModelServerConfig
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0
    file_system_poll_wait_seconds: float = 1
    batching_options: BatchingOptions = None  # None = batching off
    monitoring_config: object = None
    enable_model_warmup: bool = True
    max_request_bytes: int = 64 << 20        # see serving.limits.RequestLimits
    max_rows_per_request: int = 10_000
    max_tensor_elements: int = 10_000_000
    grpc_max_threads: int = 32
    intra_op_parallelism: int = 0
    inter_op_parallelism: int = 0
    startup_timeout_seconds: float = None
    event_loop: str = "auto"                  # see serving.loop_thread.new_event_loop


class ModelServer:
    """The whole model server; used by the CLI and usable in-process."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self._session_config = session_config(options.intra_op_parallelism,
                                              options.inter_op_parallelism)
        self.manager = ServableManager(self._load, options.file_system_poll_wait_seconds)
        self.scheduler = BatchScheduler(options.batching_options, self.metrics) \
            if options.batching_options else None
        self.limits = RequestLimits(options.max_request_bytes, options.max_rows_per_request,
                                    options.max_tensor_elements)
        self.predictor = Predictor(self.manager, self.scheduler, self.limits)
        self._grpc = None
        self._runner = None
        self._rest = None
        self._config_text = None
        self._stop_config_poll = threading.Event()

    # -- loading -------------------------------------------------------------
    def _load(self, name: str, version: int, path: str) -> Servable:
        servable = Servable(name, version, path, self._session_config).load()
        if self.options.enable_model_warmup:
            try:
                count = run_warmup(servable, self.predictor.warmup_predict)
            except BaseException:
                servable.close(timeout=0)
                raise
            if count:
                log.info("Finished reading warmup data for model %s version %d: %d records",
                         name, version, count)
        return servable

    def reload_config(self, model_config_list, wait: bool = True) -> None:
        """HandleReloadConfigRequest: replace the model list, wait for new models.

        With ``wait``, fails (UNKNOWN, as TF Serving) when a configured model
        then has no AVAILABLE version; the models that loaded keep serving.
        """
        self.manager.set_config(model_config_list)
        self.manager.poll_once()
        if wait:
            self.manager.wait_until_settled()
            _raise_unavailable(self.manager.unavailable(), "model(s)")

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        opts = self.options
        self._config_text = config_file_text(opts.model_config_file)
        self.manager.set_config(opts.model_server_config.model_config_list)
        self.manager.poll_once()
        self.manager.wait_until_settled(timeout=opts.startup_timeout_seconds)
        # as TF Serving, refuse to start when a model's versions all failed to
        # load (a model with no version yet only logs a warning, see docs)
        _raise_unavailable(self.manager.unavailable(include_empty=False), "servable(s)")
        self.manager.start()
        if opts.model_config_file and opts.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._poll_config_file, name="config-poller",
                             daemon=True).start()
        self._start_grpc()
        if opts.rest_api_port:
            self._start_rest()

    def _start_grpc(self) -> None:
        opts = self.options
        self._runner = BlockingRunner(opts.grpc_max_threads, name="grpc")
        self._grpc = AioGrpcServer(
            lambda server: add_services(server, self.predictor, self.manager,
                                        self.reload_config, self._runner, self.metrics),
            f"{opts.host}:{opts.port}",
            options=[("grpc.max_receive_message_length", opts.max_request_bytes),
                     ("grpc.max_send_message_length", -1),
                     ("grpc.so_reuseport", 0)],
            event_loop=opts.event_loop)
        self._grpc.start()
        log.info("Running gRPC ModelServer at %s (event loop: %s) ...", self._grpc.address,
                 self._grpc.loop_kind)

    def _start_rest(self) -> None:
        opts = self.options
        prom = opts.monitoring_config.prometheus_config if opts.monitoring_config else None
        handler = RestHandler(self.predictor, self.manager, self.metrics,
                              prom.path if prom is not None and prom.enable else None)
        self._rest = RestServer(handler, opts.host, opts.rest_api_port, self.limits,
                                event_loop=opts.event_loop)
        self._rest.start()
        log.info("Exporting HTTP/REST API at:%s:%d ...", opts.host, opts.rest_api_port)

    def _poll_config_file(self) -> None:
        opts = self.options
        while not self._stop_config_poll.wait(opts.model_config_file_poll_wait_seconds):
            try:
                with open(opts.model_config_file, encoding="utf-8") as f:
                    text = f.read()
                if text == self._config_text:
                    continue
                config = config_io.read_model_server_config(opts.model_config_file)
                self._config_text = text
                self.reload_config(config.model_config_list, wait=False)
                log.info("Reloaded model config from %s", opts.model_config_file)
            except Exception:  # noqa: BLE001 - keep serving the old config
                log.exception("Failed to reload model config %s", opts.model_config_file)

    def stop(self, grace: float = 30.0) -> None:
        """Stops accepting, finishes in-flight requests, unloads every model."""
        self._stop_config_poll.set()
        if self._grpc is not None:
            self._grpc.begin_stop(grace)
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.wait_stopped(grace)
        if self._runner is not None:
            self._runner.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.manager.stop()
        self.manager.unload_all()
        log.info("Server stopped")


def config_file_text(path: str) -> str:
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


class AioGrpcServer(LoopThreadServer):
    """A ``grpc.aio`` server on its own thread and event loop.

    ``add_fn(server)`` registers the services (on the loop thread).  Stopping
    refuses new RPCs, lets in-flight ones finish within the grace period, then
    stops the loop.
    """

    thread_name = "grpc-server"

    def __init__(self, add_fn, address: str, options=(), event_loop: str = "auto"):
        super().__init__(event_loop)
        self._add_fn = add_fn
        self.address = address
        self._options = list(options)
        self._server = None
        self._stop_future = None

    async def _start(self):
        self._server = grpc.aio.server(options=self._options)
        self._add_fn(self._server)
        if self._server.add_insecure_port(self.address) == 0:
            raise OSError(f"could not bind gRPC port {self.address}")
        await self._server.start()

    def begin_stop(self, grace: float) -> None:
        """Stops accepting new RPCs now; in-flight ones get ``grace`` seconds."""
        if self._loop is None or self._error is not None or self._stop_future is not None:
            return

        async def stop():
            try:
                await self._server.stop(grace)
            finally:
                asyncio.get_running_loop().stop()
        self._stop_future = asyncio.run_coroutine_threadsafe(stop(), self._loop)

    def wait_stopped(self, grace: float) -> None:
        if self._thread is None:
            return
        self._thread.join(timeout=grace + 10)


def _raise_unavailable(missing: list, what: str) -> None:
    """UNKNOWN with TF Serving's "N servable(s) did not become available: {...}"."""
    if missing:
        raise ServingError(grpc.StatusCode.UNKNOWN,
                           f"{len(missing)} {what} did not become available: {{"
                           + "".join(f"{{{m}}}, " for m in missing) + "}")
