"""Reads the server's text-proto config files (google.protobuf.text_format).

``--model_config_file`` -> ModelServerConfig, ``--batching_parameters_file`` ->
BatchingParameters, ``--monitoring_config_file`` -> MonitoringConfig; or a
one-model config from ``--model_name`` + ``--model_base_path``.
"""
import os

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.config_protos import BatchingParameters, MonitoringConfig

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


def _parse_file(path: str, message):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ValueError(f"Invalid {type(message).__name__} text proto in {path}: {exc}")


def read_model_server_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    config = _parse_file(path, model_server_config_pb2.ModelServerConfig())
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{path}: only model_config_list is supported")
    return config


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The one-model config of ``--model_name`` + ``--model_base_path``.

    A relative ``base_path`` is resolved against the working directory (TF
    Serving refuses it; config files must still give absolute paths)."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    if "://" not in base_path:
        base_path = os.path.abspath(base_path)
    model.name, model.base_path, model.model_platform = name, base_path, "tensorflow"
    return config


def read_batching_parameters(path: str):
    return _parse_file(path, BatchingParameters()) if path else BatchingParameters()


def read_monitoring_config(path: str):
    """MonitoringConfig; an enabled Prometheus config gets the default path."""
    config = _parse_file(path, MonitoringConfig()) if path else MonitoringConfig()
    prom = config.prometheus_config
    if prom.enable and not prom.path:
        prom.path = DEFAULT_PROMETHEUS_PATH
    return config
