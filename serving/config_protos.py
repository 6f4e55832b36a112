"""Config protos that the ``tensorflow-serving-api`` wheel does not ship.

The wheel carries ``model_server_config_pb2`` but neither
``tensorflow_serving.config.monitoring_config_pb2`` nor
``tensorflow_serving.servables.tensorflow.session_bundle_config_pb2``.  When
they are missing this module builds ``tensorflow.serving.MonitoringConfig``
and ``tensorflow.serving.BatchingParameters`` from descriptors with the same
package, names and field numbers as the upstream ``.proto`` files, so the same
text protos parse.
"""
from typing import Optional

from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2
from google.protobuf import message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _field(msg, name, number, ftype, type_name: Optional[str] = None, repeated=False):
    f = msg.field.add(name=name, number=number, type=ftype,
                      label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        f.type_name = type_name
    return f


def _build(file_name, build_messages, deps=()):
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(file_name)
    except KeyError:
        fdp = descriptor_pb2.FileDescriptorProto(
            name=file_name, package="tensorflow.serving", syntax="proto3")
        fdp.dependency.extend(deps)
        build_messages(fdp)
        pool.Add(fdp)
    return pool


def _monitoring(fdp):
    prom = fdp.message_type.add(name="PrometheusConfig")
    _field(prom, "enable", 1, _F.TYPE_BOOL)
    _field(prom, "path", 2, _F.TYPE_STRING)
    mon = fdp.message_type.add(name="MonitoringConfig")
    _field(mon, "prometheus_config", 1, _F.TYPE_MESSAGE,
           ".tensorflow.serving.PrometheusConfig")


def _batching(fdp):
    msg = fdp.message_type.add(name="BatchingParameters")
    i64 = ".google.protobuf.Int64Value"
    _field(msg, "max_batch_size", 1, _F.TYPE_MESSAGE, i64)
    _field(msg, "batch_timeout_micros", 2, _F.TYPE_MESSAGE, i64)
    _field(msg, "max_enqueued_batches", 3, _F.TYPE_MESSAGE, i64)
    _field(msg, "num_batch_threads", 4, _F.TYPE_MESSAGE, i64)
    _field(msg, "thread_pool_name", 5, _F.TYPE_MESSAGE, ".google.protobuf.StringValue")
    _field(msg, "allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True)
    _field(msg, "pad_variable_length_inputs", 7, _F.TYPE_BOOL)


def _message_class(pool, full_name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


try:  # pragma: no cover - depends on the installed wheel
    from tensorflow_serving.config.monitoring_config_pb2 import MonitoringConfig
except ImportError:
    _pool = _build("serving/monitoring_config.proto", _monitoring)
    MonitoringConfig = _message_class(_pool, "tensorflow.serving.MonitoringConfig")

try:  # pragma: no cover - depends on the installed wheel
    from tensorflow_serving.servables.tensorflow.session_bundle_config_pb2 import (
        BatchingParameters,
    )
except ImportError:
    assert wrappers_pb2.Int64Value  # registers google/protobuf/wrappers.proto
    _pool = _build("serving/batching_parameters.proto", _batching,
                   deps=("google/protobuf/wrappers.proto",))
    BatchingParameters = _message_class(_pool, "tensorflow.serving.BatchingParameters")

__all__ = ["MonitoringConfig", "BatchingParameters"]
