"""Predict and GetModelMetadata logic shared by the gRPC and REST front ends.

``Predictor.predict`` takes a PredictRequest and returns a PredictResponse;
``Predictor.predict_arrays`` is the same path for callers (REST) that already
hold numpy inputs.  Signature lookup and validation use the per-version
:class:`~serving.signature.Signature` computed at load time.
"""
import asyncio
import logging
import queue
import threading
from contextlib import contextmanager

from google.protobuf import any_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from serving.batching import _Task as Task
from serving.errors import failed_precondition, invalid_argument
from serving.manager import resolve_model_spec
from serving.tensors import from_numpy, shape_of, to_numpy

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"


def signature_key(name: str) -> str:
    return name or DEFAULT_SIGNATURE


def find_signature(servable, name: str):
    """The Signature called ``name`` (FAILED_PRECONDITION when absent)."""
    key = signature_key(name)
    sig = servable.signatures.get(key)
    if sig is None:
        raise failed_precondition(f"Serving signature key \"{key}\" not found.")
    return sig


def decode_inputs(signature, inputs) -> dict:
    """alias -> ndarray from a request's TensorProto map, checked against the signature."""
    signature.check_aliases(inputs.keys())
    arrays = {}
    for alias in signature.input_aliases:
        if alias not in inputs:
            continue
        proto = inputs[alias]
        shape = shape_of(proto, alias)
        signature.check_tensor(alias, proto.dtype, shape)
        arrays[alias] = to_numpy(proto, alias, shape)
    return arrays


class Predictor:
    """Runs predictions on the manager's servables, batched when enabled."""

    def __init__(self, manager, scheduler=None):
        self.manager = manager
        self.scheduler = scheduler

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

    def run(self, servable, signature, arrays: dict, output_aliases: tuple,
            deadline: float = None) -> dict:
        """Runs validated inputs, through the batch scheduler when it applies."""
        signature.check_method()
        if self.scheduler is None or not signature.batchable:
            return servable.run(signature, arrays, output_aliases)
        size = signature.check_batch_sizes(arrays)
        key = (id(servable), signature.key, output_aliases)
        return self.scheduler.run(
            key, lambda a: servable.run(signature, a, output_aliases),
            servable.name, signature, arrays, size, deadline)

    @staticmethod
    def prepare(servable, request):
        """(signature, input arrays, output aliases) of a request, validated."""
        signature = find_signature(servable, request.model_spec.signature_name)
        arrays = decode_inputs(signature, request.inputs)
        outputs = signature.resolve_outputs(request.output_filter)
        return signature, arrays, outputs

    @staticmethod
    def response(servable, request, signature, outputs, values) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = request.model_spec.name or servable.name
        spec.version.value = servable.version
        spec.signature_name = signature.key
        response_outputs = response.outputs
        for alias in outputs:
            from_numpy(values[alias], response_outputs[alias])
        return response

    def predict_on(self, servable, request, use_batching: bool = True, deadline=None):
        """Predict on an already held servable (also used by warmup)."""
        signature, arrays, outputs = self.prepare(servable, request)
        if use_batching:
            values = self.run(servable, signature, arrays, outputs, deadline)
        else:
            signature.check_method()
            values = servable.run(signature, arrays, outputs)
        return self.response(servable, request, signature, outputs, values)

    def predict(self, request, deadline: float = None) -> predict_pb2.PredictResponse:
        """``deadline``: time.monotonic() seconds after which queued work is dropped."""
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        with self.servable(request.model_spec) as servable:
            return self.predict_on(servable, request, deadline=deadline)

    async def predict_async(self, request, deadline: float = None, runner=None,
                            inline: bool = False):
        """:meth:`predict` for an asyncio front end.

        Validation and response building run on the calling event loop; the
        session runs on a batch worker (batching) or on ``runner``, a
        :class:`BlockingRunner` -- or, with ``inline`` (the caller knows no
        other request is in flight), right here, saving two thread hand-offs.
        The servable is released by whichever thread finishes the run, so a
        cancelled call never lets a swap close a session that is still running.
        """
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        model_spec = request.model_spec
        servable = self.manager.acquire(*resolve_model_spec(model_spec))
        handed_off = False
        try:
            signature, arrays, outputs = self.prepare(servable, request)
            signature.check_method()
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            release = servable.release
            scheduler = self.scheduler
            if scheduler is not None and signature.batchable:
                size = signature.check_batch_sizes(arrays)
                key = (id(servable), signature.key, outputs)
                task = Task(arrays, size, deadline, loop=loop, future=fut, on_done=release)
                handed_off = scheduler.submit(
                    key, lambda a: servable.run(signature, a, outputs),
                    servable.name, signature, task)
            if not handed_off:
                if inline or runner is None:
                    handed_off = True   # released below, after the run
                    try:
                        values = servable.run(signature, arrays, outputs)
                    finally:
                        self.manager.release(servable)
                    return self.response(servable, request, signature, outputs, values)
                runner.submit(servable.run, (signature, arrays, outputs), loop, fut, release)
                handed_off = True
        finally:
            if not handed_off:
                self.manager.release(servable)
        values = await fut
        return self.response(servable, request, signature, outputs, values)

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


class BlockingRunner:
    """Threads that run blocking calls for an event loop and resolve its futures.

    Lighter than ``loop.run_in_executor``: no concurrent.futures.Future (and so
    no Condition) per call, one queue hand-off in and one
    ``call_soon_threadsafe`` out.
    """

    _STOP = object()

    def __init__(self, threads: int, name: str = "runner"):
        self._queue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, fn, args, loop, fut, on_done=None) -> None:
        """Runs ``fn(*args)`` on a thread; its result or exception goes to ``fut``
        (on ``loop``); ``on_done`` runs on the thread first."""
        self._queue.put((fn, args, loop, fut, on_done))

    async def call(self, fn, *args):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.submit(fn, args, loop, fut)
        return await fut

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is self._STOP:
                return
            fn, args, loop, fut, on_done = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            if on_done is not None:
                try:
                    on_done()
                except Exception:  # noqa: BLE001
                    log.exception("completion callback failed")
            try:
                loop.call_soon_threadsafe(_resolve, fut, result, error)
            except RuntimeError:  # loop closed: the server is gone
                pass
            del item, fn, args, loop, fut, on_done, result, error

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(self._STOP)
        for t in self._threads:
            t.join(timeout=30)


def _resolve(fut, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
