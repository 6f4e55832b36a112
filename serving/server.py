"""Wires manager, predictor, batching, gRPC, REST and metrics into one server.

``ModelServer.start()`` applies the model config, waits for the models to
become AVAILABLE (or fail), then opens the gRPC and REST ports; ``stop()``
drains: readiness (model status) turns UNAVAILABLE, calls already sent are
picked up, the ports close, in-flight calls finish within the grace period,
and everything unloads.
"""
import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import grpc

from serving import config as config_io
from serving.batching import BatchingOptions, BatchScheduler
from serving.errors import ServingError
from serving.grpc_service import add_services
from serving.limits import RequestLimits
from serving.loop_thread import BlockingRunner, LoopThreadServer
from serving.manager import LoadRetryOptions, ServableManager
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
    model_server_config: Optional[object] = None   # ModelServerConfig
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0
    file_system_poll_wait_seconds: float = 1
    batching_options: Optional[BatchingOptions] = None   # None = batching off
    monitoring_config: Optional[object] = None   # MonitoringConfig
    enable_model_warmup: bool = True
    max_request_bytes: int = 64 << 20        # see serving.limits.RequestLimits
    max_rows_per_request: int = 10_000
    max_tensor_elements: int = 10_000_000
    grpc_max_threads: int = 32
    intra_op_parallelism: int = 0
    inter_op_parallelism: int = 0
    startup_timeout_seconds: Optional[float] = None
    event_loop: str = "auto"                  # see serving.loop_thread.new_event_loop
    max_num_load_retries: int = 5             # TF Serving's flags of the same names
    load_retry_interval_micros: int = 60_000_000
    serve_latest_good_version: bool = False   # skip versions that failed to load
    shutdown_grace_seconds: float = 10.0      # in-flight calls' time to finish on SIGTERM


class ModelServer:
    """The whole model server; used by the CLI and usable in-process."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self._session_config = session_config(options.intra_op_parallelism,
                                              options.inter_op_parallelism)
        self.manager = ServableManager(
            self._load, options.file_system_poll_wait_seconds,
            LoadRetryOptions(options.max_num_load_retries,
                             options.load_retry_interval_micros / 1e6),
            options.serve_latest_good_version)
        self.scheduler = BatchScheduler(options.batching_options, self.metrics) \
            if options.batching_options else None
        self.limits = RequestLimits(options.max_request_bytes, options.max_rows_per_request,
                                    options.max_tensor_elements)
        self.predictor = Predictor(self.manager, self.scheduler, self.limits)
        self._grpc = None
        self._prediction_service = None
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
        self.manager.start()   # load retries run while startup waits
        self.manager.wait_until_settled(timeout=opts.startup_timeout_seconds)
        # as TF Serving, refuse to start when a model's versions all failed to
        # load (a model with no version yet only logs a warning, see docs)
        _raise_unavailable(self.manager.unavailable(include_empty=False), "servable(s)")
        if opts.model_config_file and opts.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._poll_config_file, name="config-poller",
                             daemon=True).start()
        self._start_grpc()
        if opts.rest_api_port:
            self._start_rest()

    def _start_grpc(self) -> None:
        opts = self.options
        self._runner = BlockingRunner(opts.grpc_max_threads, name="grpc")

        def add(server):
            self._prediction_service = add_services(
                server, self.predictor, self.manager, self.reload_config, self._runner,
                self.metrics)
        self._grpc = AioGrpcServer(
            add,
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
                                event_loop=opts.event_loop,
                                shutdown_timeout=opts.shutdown_grace_seconds)
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

    def stop(self, grace: Optional[float] = None) -> None:
        """Drains, then unloads every model (``grace``: default the option).

        1. readiness turns false: model status (gRPC and REST) answers
           UNAVAILABLE "Server is shutting down", so probes and load balancers
           stop sending; requests are still served;
        2. calls already sent are picked up: the ports stay open until no gRPC
           Predict is in flight, or ``DRAIN_SETTLE_SECONDS`` (calls that gRPC
           has received but not yet handed to the server would be cancelled
           by its shutdown);
        3. the ports close (new calls are refused) and in-flight calls get the
           rest of ``grace`` to finish; then the models unload.
        """
        grace = self.options.shutdown_grace_seconds if grace is None else max(0.0, grace)
        deadline = time.monotonic() + grace
        self._stop_config_poll.set()
        self.manager.begin_drain()
        service = self._prediction_service
        if service is not None:
            service.begin_drain()
        if self._grpc is not None:
            self._grpc.begin_stop(grace, service and (lambda: service.predicts_in_flight))
            self._grpc.wait_settled(grace)
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.wait_stopped(max(0.0, deadline - time.monotonic()))
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
        self._settled = threading.Event()

    async def _start(self):
        self._server = grpc.aio.server(options=self._options)
        self._add_fn(self._server)
        if self._server.add_insecure_port(self.address) == 0:
            raise OSError(f"could not bind gRPC port {self.address}")
        await self._server.start()

    def begin_stop(self, grace: float, in_flight: Optional[Callable[[], int]] = None) -> None:
        """Settles (see ``ModelServer.stop``), then refuses new RPCs; in-flight
        ones get the rest of ``grace`` seconds.  ``in_flight()``: calls running."""
        if self._loop is None or self._error is not None or self._stop_future is not None:
            self._settled.set()
            return

        async def stop():
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                if in_flight is not None:
                    await settle(in_flight, min(DRAIN_SETTLE_SECONDS, grace))
                self._settled.set()
                await self._server.stop(max(0.0, grace - (loop.time() - started)))
            finally:
                self._settled.set()
                loop.stop()
        self._stop_future = asyncio.run_coroutine_threadsafe(stop(), self._loop)

    def wait_settled(self, timeout: float) -> None:
        self._settled.wait(timeout)

    def wait_stopped(self, grace: float) -> None:
        if self._thread is None:
            return
        self._thread.join(timeout=grace + 10)


#: longest time the ports stay open after SIGTERM, for calls already sent
DRAIN_SETTLE_SECONDS = 1.0
_SETTLE_CHECK_SECONDS = 0.05


async def settle(in_flight: Callable[[], int], limit: float) -> None:
    """Returns once ``in_flight()`` was 0 on two checks in a row with the loop
    free in between (so calls gRPC had queued were handed over), or after
    ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    quiet = 0
    while quiet < 2 and loop.time() < end:
        await asyncio.sleep(_SETTLE_CHECK_SECONDS)
        quiet = quiet + 1 if in_flight() == 0 else 0


def _raise_unavailable(missing: list, what: str) -> None:
    """UNKNOWN with TF Serving's "N servable(s) did not become available: {...}"."""
    if missing:
        raise ServingError(grpc.StatusCode.UNKNOWN,
                           f"{len(missing)} {what} did not become available: {{"
                           + "".join(f"{{{m}}}, " for m in missing) + "}")
