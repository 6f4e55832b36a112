"""Unit tests of the asyncio request path: runner threads, batch futures,
servable lifetime on cancellation, and the default session config."""
import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

import serving_models
from serving.batching import BatchingOptions, BatchScheduler, Task
from serving.errors import ServingError
from serving.loop_thread import BlockingRunner
from serving.servable import Servable, session_config


def test_blocking_runner_results_errors_and_on_done_order():
    runner = BlockingRunner(2)
    events = []

    def boom():
        raise ValueError("bad")

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        runner.submit(lambda x: x * 2, (21,), loop, fut, lambda: events.append("done"))
        assert await fut == 42
        assert events == ["done"]          # on_done ran before the caller woke
        with pytest.raises(ValueError):
            await runner.call(boom)
        # a caller that went away: the result is dropped, nothing raises
        gone = loop.create_future()
        gone.cancel()
        runner.submit(time.sleep, (0.01,), loop, gone, lambda: events.append("gone"))
        await asyncio.sleep(0.1)
        assert events == ["done", "gone"]

    try:
        asyncio.run(main())
    finally:
        runner.stop()


def test_batch_futures_merge_and_expired_deadline():
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=8, batch_timeout_micros=50000,
                                               num_batch_threads=1))
    runs, released = [], []

    def run_fn(arrays):
        runs.append(arrays["x"].copy())
        return {"y": arrays["x"] * 10}

    async def main():
        loop = asyncio.get_running_loop()
        futs = []
        for i, deadline in enumerate([None, time.monotonic() - 1, None]):
            fut = loop.create_future()
            task = Task({"x": np.full(i + 1, float(i))}, i + 1, deadline, loop=loop,
                        future=fut, on_done=lambda i=i: released.append(i))
            assert scheduler.submit("k", run_fn, "m", None, task)
            futs.append(fut)
        return await asyncio.gather(*futs, return_exceptions=True)

    try:
        a, b, c = asyncio.run(main())
    finally:
        scheduler.stop()
    assert len(runs) == 1 and runs[0].tolist() == [0.0, 2.0, 2.0, 2.0]
    assert a["y"].tolist() == [0.0] and c["y"].tolist() == [20.0, 20.0, 20.0]
    assert isinstance(b, ServingError) and b.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(released) == [0, 1, 2]


def test_oversized_task_is_not_queued():
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=2, num_batch_threads=1))
    try:
        task = Task({"x": np.zeros(3)}, 3, loop=object(), future=object())
        assert scheduler.submit("k", None, "m", None, task) is False
    finally:
        scheduler.stop()


class _Servable:
    name, version = "m", 1

    def __init__(self):
        self.held = 0
        self.gate = threading.Event()

    def acquire(self):
        self.held += 1

    def release(self):
        self.held -= 1


def test_cancelled_predict_keeps_servable_until_run_ends():
    """A caller cancelled mid-run must not release the servable (a hot swap
    would close the session under the running batch)."""
    from serving.predict import Predictor, Prepared

    servable = _Servable()

    class Manager:
        def acquire(self, name, version, label):
            servable.acquire()
            return servable

        def release(self, s):
            s.release()

    runner = BlockingRunner(1)
    predictor = Predictor(Manager())
    started = threading.Event()

    def slow(*_):
        started.set()
        servable.gate.wait(5)
        return {}

    predictor.prepare = lambda s, r: Prepared(type("Sig", (), {
        "check_method": lambda self: None, "batchable": False, "key": "k"})(), {}, (), 0)
    servable.run = slow

    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"

    async def main():
        task = asyncio.ensure_future(predictor.predict_async(request, None, runner))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert servable.held == 1          # still held: the run has not ended
        servable.gate.set()
        for _ in range(200):
            if servable.held == 0:
                break
            await asyncio.sleep(0.005)
        assert servable.held == 0

    try:
        asyncio.run(main())
    finally:
        runner.stop()


def test_default_session_config_runs_ops_in_the_calling_thread(tmp_path):
    config = session_config()
    assert config.inter_op_parallelism_threads == -1
    assert session_config(0, 3).inter_op_parallelism_threads == 3
    path = serving_models.build_model(str(tmp_path / "1"), warmup_records=0)
    servable = Servable("m", 1, path, config).load()
    try:
        sig = servable.signatures["serving_default"]
        arrays = {"user_id": np.array([b"u1", b"u2"], dtype=object),
                  "age": np.array([30.0, 40.0], dtype=np.float32)}
        got = servable.run(sig, arrays, tuple(sig.output_aliases))
        want = serving_models.call_in_process(path, "serving_default",
                                              user_id=["u1", "u2"], age=[30.0, 40.0])
        for alias in sig.output_aliases:
            np.testing.assert_array_equal(got[alias], want[alias])
    finally:
        servable.close(timeout=0)
