"""Server-side batching: merges concurrent Predict calls into one sess.run.

Tasks for the same (servable version, signature, output set) share a queue.
A queue holds batches of at most ``max_batch_size`` rows; ``num_batch_threads``
workers run a batch when it is full or its oldest task has waited
``batch_timeout_micros``.  A task that would need a new batch when the queue
already holds ``max_enqueued_batches`` is rejected (RESOURCE_EXHAUSTED).
Inputs are concatenated along dim 0 (inputs with differing trailing shapes are
padded with ""/0 when ``pad_variable_length_inputs`` is set, and rank-2 string
inputs such as ``seen_item_ids`` always); the batch is padded up to the next
``allowed_batch_sizes`` entry by repeating its first row; outputs are split
back per task.  A task larger than ``max_batch_size`` runs alone.
"""
import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import grpc
import numpy as np

from serving.errors import ServingError, from_exception, invalid_argument, resource_exhausted
from serving.loop_thread import resolve

log = logging.getLogger(__name__)

#: The project contract answers a full queue with RESOURCE_EXHAUSTED (HTTP 429).
#: Upstream TF Serving's SharedBatchScheduler answers UNAVAILABLE (HTTP 503)
#: with the same message; switch here to match it.
QUEUE_FULL_ERROR = resource_exhausted


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = max(1, os.cpu_count() or 1)
    allowed_batch_sizes: tuple = ()
    pad_variable_length_inputs: bool = False

    @classmethod
    def from_proto(cls, params) -> "BatchingOptions":
        """From a ``tensorflow.serving.BatchingParameters`` message."""
        kw = {}
        for name in ("max_batch_size", "batch_timeout_micros",
                     "max_enqueued_batches", "num_batch_threads"):
            if params.HasField(name):
                kw[name] = int(getattr(params, name).value)
        kw["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
        kw["pad_variable_length_inputs"] = params.pad_variable_length_inputs
        opts = cls(**kw)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.max_batch_size < 1 or self.num_batch_threads < 1 or \
                self.max_enqueued_batches < 1 or self.batch_timeout_micros < 0:
            raise invalid_argument("Batching parameters must be positive "
                                   "(max_batch_size, num_batch_threads, max_enqueued_batches)")
        sizes = list(self.allowed_batch_sizes)
        if sizes:
            if sizes != sorted(set(sizes)) or sizes[0] < 1:
                raise invalid_argument("allowed_batch_sizes entries must be increasing")
            if sizes[-1] != self.max_batch_size:
                raise invalid_argument(
                    "Last entry in allowed_batch_sizes must equal max_batch_size; last "
                    f"entry was {sizes[-1]}; expected {self.max_batch_size}")

    def padded_size(self, size: int) -> int:
        for allowed in self.allowed_batch_sizes:
            if allowed >= size:
                return allowed
        return size


class Task:
    """One request's rows.  Completion: ``done`` (an Event) for blocking callers,
    or ``future`` resolved on ``loop`` for asyncio callers; ``on_done`` (e.g.
    releasing the servable) runs on the worker before the caller is woken."""
    __slots__ = ("arrays", "size", "deadline", "enqueued", "done", "result", "error",
                 "loop", "future", "on_done", "finished")

    def __init__(self, arrays: dict, size: int, deadline: Optional[float] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None,
                 future: Optional[asyncio.Future] = None,
                 on_done: Optional[Callable[[], None]] = None):
        self.arrays, self.size, self.deadline = arrays, size, deadline
        self.enqueued = time.monotonic()
        self.loop, self.future, self.on_done = loop, future, on_done
        self.done = threading.Event() if future is None else None
        self.result = self.error = None
        self.finished = False


def _resolve_futures(tasks) -> None:
    """On the event loop: hands each task's result or error to its future."""
    for t in tasks:
        resolve(t.future, t.result, t.error)


def complete(tasks) -> None:
    """Marks tasks finished: runs ``on_done``, wakes blocking callers, and
    resolves asyncio futures with one wake-up per event loop."""
    by_loop = None
    for t in tasks:
        if t.finished:
            continue
        t.finished = True
        if t.on_done is not None:
            try:
                t.on_done()
            except Exception:  # noqa: BLE001 - must not keep callers waiting
                log.exception("task completion callback failed")
        if t.future is None:
            t.done.set()
        else:
            if by_loop is None:
                by_loop = {}
            by_loop.setdefault(t.loop, []).append(t)
    if by_loop:
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_futures, group)
            except RuntimeError:  # loop closed: the server is gone
                pass


class _Batch:
    __slots__ = ("tasks", "size", "created")

    def __init__(self):
        self.tasks, self.size, self.created = [], 0, time.monotonic()


class _Queue:
    __slots__ = ("run_fn", "model_name", "signature", "batches")

    def __init__(self, run_fn, model_name, signature):
        self.run_fn, self.model_name, self.signature = run_fn, model_name, signature
        self.batches = deque()


def _pad_to(arr: np.ndarray, shape: tuple) -> np.ndarray:
    if arr.shape == shape:
        return arr
    out = np.full(shape, b"" if arr.dtype == object else 0, dtype=arr.dtype)
    out[tuple(slice(0, d) for d in arr.shape)] = arr
    return out


def merge_inputs(tasks, signature, pad_variable_length: bool):
    """Concatenates the tasks' inputs along dim 0; None if they cannot merge."""
    merged = {}
    for alias in tasks[0].arrays:
        parts = [t.arrays[alias] for t in tasks]
        trailing = {p.shape[1:] for p in parts}
        if len(trailing) > 1:
            spec = signature.inputs[alias]
            ranks = {len(t) for t in trailing}
            padable = pad_variable_length or (spec.np_dtype is object and spec.shape is not None
                                              and len(spec.shape) == 2)
            if len(ranks) > 1 or not padable:
                return None
            width = tuple(max(dims) for dims in zip(*trailing))
            parts = [_pad_to(p, (p.shape[0],) + width) for p in parts]
        merged[alias] = np.concatenate(parts, axis=0)
    return merged


def pad_rows(arrays: dict, size: int, target: int) -> dict:
    """Pads every input to ``target`` rows by repeating row 0."""
    if target == size:
        return arrays
    return {a: np.concatenate([v, np.repeat(v[:1], target - size, axis=0)], axis=0)
            for a, v in arrays.items()}


class BatchScheduler:
    """Shared batch scheduler for all models (one thread pool, many queues)."""

    def __init__(self, options: BatchingOptions, metrics=None):
        self.options = options
        self._metrics = metrics
        self._cv = threading.Condition()
        self._queues = {}
        self._stopping = False
        self._threads = [threading.Thread(target=self._worker, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for t in self._threads:
            t.start()

    def run(self, key, run_fn, model_name, signature, arrays: dict, size: int,
            deadline: Optional[float] = None) -> dict:
        """Runs ``run_fn(arrays)`` batched with concurrent tasks under ``key``.

        ``deadline`` (time.monotonic() seconds, e.g. from the gRPC deadline): a
        task still queued past it is dropped with RESOURCE_EXHAUSTED, as TF
        Serving's batching session answers it.
        """
        task = Task(arrays, size, deadline)
        if not self.submit(key, run_fn, model_name, signature, task):
            return run_fn(arrays)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def submit(self, key, run_fn, model_name, signature, task: Task) -> bool:
        """Queues ``task`` without waiting; it completes through :func:`complete`.

        False (and nothing queued) when the task is larger than
        ``max_batch_size``: the caller runs it alone.  Raises RESOURCE_EXHAUSTED
        when the queue is full, UNAVAILABLE when stopping.
        """
        opts = self.options
        size = task.size
        if size > opts.max_batch_size:
            if self._metrics:
                self._metrics.record_batch(model_name, size)
            return False
        with self._cv:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "Server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(run_fn, model_name, signature)
            batches = queue.batches
            if batches and batches[-1].size + size <= opts.max_batch_size:
                batch = batches[-1]
                wake = False
            else:
                if len(batches) >= opts.max_enqueued_batches:
                    raise QUEUE_FULL_ERROR(
                        "The batch scheduling queue to which this task was submitted is "
                        f"full; currently {len(batches)} batches enqueued and "
                        f"max_enqueued_batches is {opts.max_enqueued_batches}")
                batch = _Batch()
                batches.append(batch)
                wake = True     # a new deadline the workers do not know yet
            batch.tasks.append(task)
            batch.size += size
            # Waking a worker for every task only to find the batch not ready
            # costs a thread switch per request: wake it for a new batch (its
            # timeout) or a full one, otherwise the timed wait covers it.
            if wake or batch.size >= opts.max_batch_size:
                self._cv.notify()
        return True

    # -- workers -----------------------------------------------------------
    def _ready(self, batch: _Batch, now: float) -> float:
        """0 when ready to run, else seconds until it will be."""
        if batch.size >= self.options.max_batch_size or self._stopping:
            return 0.0
        return max(0.0, batch.created + self.options.batch_timeout_micros / 1e6 - now)

    def _next_batch(self):
        with self._cv:
            while True:
                now = time.monotonic()
                wait = None
                for key, queue in list(self._queues.items()):
                    if not queue.batches:
                        continue
                    left = self._ready(queue.batches[0], now)
                    if left <= 0:
                        batch = queue.batches.popleft()
                        if not queue.batches:
                            del self._queues[key]   # servables come and go
                        if self._queues:
                            # more batches wait: let an idle worker time them
                            self._cv.notify()
                        return queue, batch
                    wait = left if wait is None else min(wait, left)
                if self._stopping and not self._queues:
                    return None, None
                self._cv.wait(timeout=wait)

    def _worker(self) -> None:
        while True:
            queue, batch = self._next_batch()
            if batch is None:
                return
            self._process(queue, batch)

    def _process(self, queue: _Queue, batch: _Batch) -> None:
        started = time.monotonic()
        tasks = self._drop_expired(batch.tasks, started)
        if not tasks:
            return
        batch.size = sum(t.size for t in tasks)
        if self._metrics:
            for t in tasks:
                self._metrics.record_queuing(queue.model_name, started - t.enqueued)
        try:
            merged = merge_inputs(tasks, queue.signature, self.options.pad_variable_length_inputs) \
                if len(tasks) > 1 else tasks[0].arrays
            if merged is None:   # incompatible shapes: run one by one
                for t in tasks:
                    self._finish([t], t.arrays, t.size, queue)
                return
            self._finish(tasks, merged, batch.size, queue)
        except BaseException as exc:  # noqa: BLE001
            err = from_exception(exc)
            left = [t for t in tasks if not t.finished]
            for t in left:
                t.error = err
            complete(left)

    @staticmethod
    def _drop_expired(tasks, now):
        """The tasks still worth running: not past their deadline, and not
        abandoned (an asyncio caller that was cancelled: client gone)."""
        live, dropped = [], []
        for t in tasks:
            if t.deadline is not None and now > t.deadline:
                t.error = resource_exhausted(
                    "Run() timeout exceeded while waiting in batching queue")
                dropped.append(t)
            elif t.future is not None and t.future.done():
                dropped.append(t)
            else:
                live.append(t)
        if dropped:
            complete(dropped)
        return live

    def _finish(self, tasks, arrays, size, queue) -> None:
        target = self.options.padded_size(size)
        try:
            outputs = queue.run_fn(pad_rows(arrays, size, target))
            if self._metrics:
                self._metrics.record_batch(queue.model_name, target)
            offset = 0
            for t in tasks:
                t.result = {}
                for alias, value in outputs.items():
                    if value.ndim == 0 or value.shape[0] != target:
                        raise invalid_argument(
                            f"Batched output \"{alias}\" has shape {list(value.shape)}; "
                            f"expected {target} rows")
                    t.result[alias] = value[offset:offset + t.size]
                offset += t.size
        except BaseException as exc:  # noqa: BLE001
            err = from_exception(exc)
            for t in tasks:
                t.error = err
        complete(tasks)

    def stop(self) -> None:
        """Runs what is queued, then stops the workers."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
