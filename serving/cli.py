"""``twotower-serve`` / ``python -m serving``: tensorflow_model_server's flags.

Runs until SIGTERM or SIGINT, then drains (readiness false, ports closed,
in-flight calls finished within ``--shutdown_grace_seconds``) and exits 0.
"""
import argparse
import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from serving import config as config_io
from serving.batching import BatchingOptions
from serving.errors import ServingError
from serving.loop_thread import EVENT_LOOPS

MiB = 1 << 20


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="twotower-serve",
        description="A model server that speaks TensorFlow Serving's gRPC and REST APIs "
                    "(session-based SavedModel loading; flags as tensorflow_model_server).")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    p.add_argument("--rest_api_port", type=int, default=8501,
                   help="REST port; 0 turns REST off (default 8501)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address both ports bind to (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--model_name", default="default",
                   help="name of the model served with --model_base_path")
    p.add_argument("--model_base_path", default="",
                   help="directory holding integer-named version directories")
    p.add_argument("--model_config_file", default="",
                   help="ModelServerConfig text proto (overrides --model_name/--model_base_path)")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0,
                   help="re-read --model_config_file this often; 0 = read once")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1,
                   help="how often base paths are polled for new versions (default 1)")
    p.add_argument("--enable_batching", type=_bool, nargs="?", const=True, default=False,
                   help="merge concurrent Predict calls (server-side batching)")
    p.add_argument("--batching_parameters_file", default="",
                   help="BatchingParameters text proto (needs --enable_batching, as in "
                        "tensorflow_model_server)")
    p.add_argument("--monitoring_config_file", default="",
                   help="MonitoringConfig text proto (Prometheus on the REST port)")
    p.add_argument("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True,
                   help="replay assets.extra/tf_serving_warmup_requests at load (default true)")
    p.add_argument("--max_request_size_bytes", type=int, default=64 * MiB,
                   help="largest accepted gRPC message / REST body, refused before it "
                        "is read (default 64 MiB)")
    p.add_argument("--max_rows_per_request", type=int, default=10_000,
                   help="most rows (dim 0) one Predict may have; larger requests are "
                        "refused INVALID_ARGUMENT (default 10000)")
    p.add_argument("--max_tensor_elements", type=int, default=10_000_000,
                   help="most elements one input tensor may declare; checked before "
                        "decoding (default 10000000)")
    p.add_argument("--grpc_max_threads", type=int, default=32,
                   help="gRPC handler threads (default 32)")
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                   help="threads per op; 0 = the cores this process may use")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                   help="ops run in parallel per session run; 0 = in the calling thread "
                        "(the server runs requests on its own threads)")
    p.add_argument("--event_loop", choices=EVENT_LOOPS, default="auto",
                   help="event loop of the gRPC and REST front ends: uvloop (about a third "
                        "less CPU per request), asyncio, or auto = uvloop when installed")
    p.add_argument("--max_num_load_retries", type=int, default=5,
                   help="times a failed version load is retried, e.g. a version whose "
                        "variables/ was still being copied (default 5, as TF Serving)")
    p.add_argument("--load_retry_interval_micros", type=int, default=60_000_000,
                   help="microseconds between load retries (default 60000000 = 1 min)")
    p.add_argument("--serve_latest_good_version", type=_bool, nargs="?", const=True,
                   default=False,
                   help="the version policy skips versions that failed to load, so a "
                        "corrupt newest version leaves the latest good one serving, also "
                        "at startup (default false: TF Serving refuses to start)")
    p.add_argument("--shutdown_grace_seconds", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, time in-flight calls get to finish after the "
                        "ports close (default 10)")
    p.add_argument("--log_level", default="INFO", help="Python logging level (default INFO)")
    return p


def options_from_args(args):
    from serving.server import ServerOptions

    if args.model_config_file:
        model_config = config_io.read_model_server_config(args.model_config_file)
    elif args.model_base_path:
        model_config = config_io.single_model_config(args.model_name, args.model_base_path)
    else:
        raise SystemExit("twotower-serve: give --model_base_path or --model_config_file")
    if args.max_num_load_retries < 0 or args.load_retry_interval_micros < 0:
        raise SystemExit("twotower-serve: --max_num_load_retries and "
                         "--load_retry_interval_micros must be >= 0")
    if args.shutdown_grace_seconds < 0:
        raise SystemExit("twotower-serve: --shutdown_grace_seconds must be >= 0")
    if args.batching_parameters_file and not args.enable_batching:
        raise SystemExit("twotower-serve: server_options.batching_parameters_file is set "
                         "without setting server_options.enable_batching to true.")
    for flag in ("max_request_size_bytes", "max_rows_per_request", "max_tensor_elements"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    batching = None
    if args.enable_batching:
        batching = BatchingOptions.from_proto(
            config_io.read_batching_parameters(args.batching_parameters_file))
    return ServerOptions(
        host=args.host, port=args.port, rest_api_port=args.rest_api_port,
        model_server_config=model_config, model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        batching_options=batching,
        monitoring_config=config_io.read_monitoring_config(args.monitoring_config_file),
        enable_model_warmup=args.enable_model_warmup,
        max_request_bytes=args.max_request_size_bytes,
        max_rows_per_request=args.max_rows_per_request,
        max_tensor_elements=args.max_tensor_elements,
        grpc_max_threads=args.grpc_max_threads,
        intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        inter_op_parallelism=args.tensorflow_inter_op_parallelism,
        event_loop=args.event_loop,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_micros=args.load_retry_interval_micros,
        serve_latest_good_version=args.serve_latest_good_version,
        shutdown_grace_seconds=args.shutdown_grace_seconds)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = options_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"twotower-serve: {exc}", file=sys.stderr)
        return 2
    from serving.server import ModelServer  # imports TensorFlow: after --help

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = ModelServer(options)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        reason = f"{exc.code_name}: {exc.message}" if isinstance(exc, ServingError) else exc
        logging.getLogger("serving").error("Failed to start server. Error: %s", reason)
        server.stop(grace=0)
        return 1
    logging.getLogger("serving").info("Server ready")
    while not stop.wait(1.0):
        pass
    logging.getLogger("serving").info("Shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
