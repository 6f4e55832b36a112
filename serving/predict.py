"""Predict, GetModelMetadata and GetModelStatus logic shared by the gRPC and REST front ends.

Both front ends prepare a request in one step: :func:`check_inputs` checks the
inputs' aliases, dtypes and shapes against the version's
:class:`~serving.signature.Signature` (computed at load time) and the
:class:`~serving.limits.RequestLimits`, from the declared shapes, before any
value is decoded (gRPC) or run (REST).  ``Predictor.predict`` takes a
PredictRequest and returns a PredictResponse; ``predict_async`` is the same
path for an asyncio front end; ``run`` runs a :class:`Prepared` request.
"""
import asyncio
import logging
import time
from contextlib import contextmanager
from typing import NamedTuple, Optional

import grpc
import numpy as np
from google.protobuf import any_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from serving.batching import BatchScheduler, Task
from serving.errors import ServingError, failed_precondition, invalid_argument
from serving.limits import RequestLimits
from serving.loop_thread import BlockingRunner
from serving.manager import resolve_model_spec
from serving.tensors import from_numpy, shape_of, to_numpy

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"
#: A gRPC Predict of at most this many rows is decoded and answered on the
#: event loop (and, when it is the only one in flight, run there too, saving
#: two thread hand-offs); a larger one is handled whole on a worker thread, so
#: the loop keeps answering small requests while it runs.
INLINE_MAX_ROWS = 64
#: A batchable signature runs at most this many rows per session run; a larger
#: request is run in slices (see :func:`run_in_slices`).
SLICE_ROWS = 4096


def signature_key(name: str) -> str:
    return name or DEFAULT_SIGNATURE


def find_signature(servable, name: str):
    """The Signature called ``name`` (FAILED_PRECONDITION when absent)."""
    key = signature_key(name)
    sig = servable.signatures.get(key)
    if sig is None:
        raise failed_precondition(f"Serving signature key \"{key}\" not found.")
    return sig


class Prepared(NamedTuple):
    """A validated request: what to run and how many rows it has."""
    signature: object          # serving.signature.Signature
    arrays: dict               # alias -> ndarray
    outputs: tuple             # output aliases to fetch
    rows: int                  # dim 0 of the batched inputs (0 if none)


def check_inputs(signature, shapes: dict, limits: RequestLimits) -> int:
    """The request check both front ends share; ``shapes``: alias -> (dtype, shape).

    Aliases, then each input's dtype and shape against the SignatureDef and
    the element cap, then the row cap.  Returns the rows (dim 0 of the
    batched inputs).  Runs before decoding, so a declared shape can never
    make the server allocate what the limits refuse.
    """
    signature.check_aliases(shapes.keys())
    for alias in signature.input_aliases:
        if alias in shapes:
            dtype, shape = shapes[alias]
            signature.check_tensor(alias, dtype, shape)
            limits.check_elements(alias, shape)
    rows = signature.batch_size(shapes)
    limits.check_rows(rows)
    return rows


def decode_inputs(signature, inputs, limits: RequestLimits):
    """(alias -> ndarray, rows) from a request's TensorProto map, checked first."""
    shapes = {alias: (proto.dtype, shape_of(proto, alias)) for alias, proto in inputs.items()}
    rows = check_inputs(signature, shapes, limits)
    arrays = {alias: to_numpy(inputs[alias], alias, shape)
              for alias, (_, shape) in shapes.items()}
    return arrays, rows


def run_in_slices(servable, signature, arrays: dict, outputs: tuple,
                  deadline: Optional[float] = None) -> dict:
    """``servable.run``, ``SLICE_ROWS`` rows at a time when a batchable
    signature gets more (the rows are independent: batching merges requests
    on the same assumption).  Between slices the threads of the front ends get
    the interpreter (TensorFlow converts string tensors holding it), and a
    request whose ``deadline`` (time.monotonic() seconds) has passed stops:
    its client has given up."""
    rows = next(iter(arrays.values())).shape[0] if arrays and signature.batchable else 0
    if rows <= SLICE_ROWS:
        return servable.run(signature, arrays, outputs)
    parts = []
    for start in range(0, rows, SLICE_ROWS):
        if deadline is not None and time.monotonic() > deadline:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"Deadline exceeded after {start} of {rows} rows")
        parts.append(servable.run(
            signature, {a: v[start:start + SLICE_ROWS] for a, v in arrays.items()}, outputs))
    return {alias: np.concatenate([p[alias] for p in parts]) for alias in outputs}


def declared_rows(request) -> int:
    """The largest dim 0 a PredictRequest's inputs declare (0 for scalars), read
    from the shapes alone: nothing is decoded."""
    return max((proto.tensor_shape.dim[0].size for proto in request.inputs.values()
                if proto.tensor_shape.dim), default=0)


def status_response(manager, model_spec) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatusResponse for a ModelSpec (name, optional version or label)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state, error in manager.status(*resolve_model_spec(model_spec)):
        entry = response.model_version_status.add(version=version, state=state)
        entry.status.SetInParent()   # TF Serving always reports a status (OK by default)
        if error is not None:
            entry.status.error_code = error.code.value[0]
            entry.status.error_message = error.message
    return response


class Predictor:
    """Runs predictions on the manager's servables, batched when enabled."""

    def __init__(self, manager, scheduler: Optional[BatchScheduler] = None,
                 limits: Optional[RequestLimits] = None):
        self.manager = manager
        self.scheduler = scheduler
        self.limits = limits or RequestLimits()

    @contextmanager
    def servable(self, model_spec):
        """Holds the servable a ModelSpec resolves to for the block's duration."""
        if model_spec is None:
            raise invalid_argument("Missing ModelSpec")
        servable = self.manager.acquire(*resolve_model_spec(model_spec))
        try:
            yield servable
        finally:
            self.manager.release(servable)

    def prepare_arrays(self, signature, arrays: dict, output_filter=()) -> Prepared:
        """A :class:`Prepared` request from decoded inputs (REST's JSON)."""
        shapes = {alias: (signature.inputs[alias].dtype, arr.shape)
                  for alias, arr in arrays.items()}
        rows = check_inputs(signature, shapes, self.limits)
        return Prepared(signature, arrays, signature.resolve_outputs(output_filter), rows)

    def prepare(self, servable, request) -> Prepared:
        """A :class:`Prepared` request from a PredictRequest, validated before decoding."""
        signature = find_signature(servable, request.model_spec.signature_name)
        arrays, rows = decode_inputs(signature, request.inputs, self.limits)
        return Prepared(signature, arrays, signature.resolve_outputs(request.output_filter),
                        rows)

    def run(self, servable, prepared: Prepared, deadline: Optional[float] = None,
            use_batching: bool = True) -> dict:
        """Runs a prepared request, through the batch scheduler when it applies."""
        signature, arrays, outputs, rows = prepared
        signature.check_method()
        if not use_batching or self.scheduler is None or not signature.batchable:
            return run_in_slices(servable, signature, arrays, outputs, deadline)
        key = (id(servable), signature.key, outputs)
        # the run function serves every request merged into a batch: no one
        # request's deadline (the scheduler drops expired requests itself)
        return self.scheduler.run(
            key, lambda a: run_in_slices(servable, signature, a, outputs),
            servable.name, signature, arrays, rows, deadline)

    @staticmethod
    def response(servable, request, prepared: Prepared, values) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = request.model_spec.name or servable.name
        spec.version.value = servable.version
        spec.signature_name = prepared.signature.key
        response_outputs = response.outputs
        for alias in prepared.outputs:
            from_numpy(values[alias], response_outputs[alias])
        return response

    def predict_on(self, servable, request, use_batching: bool = True,
                   deadline: Optional[float] = None) -> predict_pb2.PredictResponse:
        """Predict on an already held servable (also used by warmup)."""
        prepared = self.prepare(servable, request)
        values = self.run(servable, prepared, deadline, use_batching)
        return self.response(servable, request, prepared, values)

    def predict(self, request, deadline: Optional[float] = None) -> predict_pb2.PredictResponse:
        """``deadline``: time.monotonic() seconds after which queued work is dropped."""
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        with self.servable(request.model_spec) as servable:
            return self.predict_on(servable, request, deadline=deadline)

    async def predict_async(self, request, deadline: Optional[float] = None,
                            runner: Optional[BlockingRunner] = None,
                            inline: bool = False) -> predict_pb2.PredictResponse:
        """:meth:`predict` for an asyncio front end.

        A request of at most ``INLINE_MAX_ROWS`` rows is decoded and answered
        on the calling event loop; its session runs on a batch worker
        (batching) or on ``runner``, a :class:`~serving.loop_thread.BlockingRunner`
        -- or right here when ``inline`` (the caller knows no other request is
        in flight), saving two thread hand-offs.  A larger request is handled
        whole (decoding, run, response) on a ``runner`` thread, so the loop
        keeps answering small requests meanwhile.  The servable is released by
        whichever thread finishes the run, so a cancelled call never lets a
        swap close a session that is still running; a call cancelled before
        its run starts is not run.
        """
        if runner is not None and declared_rows(request) > INLINE_MAX_ROWS:
            return await runner.call(self.predict, request, deadline)
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        servable = self.manager.acquire(*resolve_model_spec(request.model_spec))
        handed_off = False
        try:
            prepared = self.prepare(servable, request)
            signature, arrays, outputs, rows = prepared
            signature.check_method()
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            release = servable.release
            scheduler = self.scheduler
            if scheduler is not None and signature.batchable:
                key = (id(servable), signature.key, outputs)
                task = Task(arrays, rows, deadline, loop=loop, future=fut, on_done=release)
                handed_off = scheduler.submit(
                    key, lambda a: servable.run(signature, a, outputs),
                    servable.name, signature, task)
            if not handed_off:
                if runner is None or inline:
                    handed_off = True   # released below, after the run
                    try:
                        values = servable.run(signature, arrays, outputs)
                    finally:
                        self.manager.release(servable)
                    return self.response(servable, request, prepared, values)
                runner.submit(servable.run, (signature, arrays, outputs), loop, fut, release)
                handed_off = True
        finally:
            if not handed_off:
                self.manager.release(servable)
        values = await fut
        return self.response(servable, request, prepared, values)

    def warmup_predict(self, servable, request) -> None:
        """Warmup replay: same checks, no batching, response discarded."""
        self.predict_on(servable, request, use_batching=False)

    def metadata(self, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        if not request.metadata_field:
            raise invalid_argument(
                "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise invalid_argument(f"Metadata field {field} is not supported")
        with self.servable(request.model_spec) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = servable.version
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig_def in servable.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(sig_def)
            packed = any_pb2.Any()
            packed.Pack(sig_map)
            response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(packed)
            return response
