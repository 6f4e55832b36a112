"""Prometheus metrics with TF Serving's series names, in an own registry.

Series: ``:tensorflow:serving:request_count{model_name,status}`` (counter),
``:tensorflow:serving:request_latency{model_name,API,entrypoint}`` (histogram,
microseconds), ``:tensorflow:serving:batching_session:batch_size{model_name}``
and ``:tensorflow:serving:batching_session:queuing_latency{model_name}``.

prometheus_client accepts names that start with ':' but appends ``_total`` to
counter families; :meth:`Metrics.exposition` restores TF Serving's exact
``:tensorflow:serving:request_count`` name.
"""
import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import Metric

prometheus_client.disable_created_metrics()

REQUEST_COUNT = ":tensorflow:serving:request_count"
LATENCY_BUCKETS_US = tuple(10 * 1.8 ** i for i in range(33))
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class _CounterCollector:
    """request_count, kept in a dict so the sample name stays unsuffixed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}

    def inc(self, model_name: str, status: str) -> None:
        with self._lock:
            key = (model_name, status)
            self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self):
        family = Metric(REQUEST_COUNT,
                        "The total number of requests.", "counter")
        with self._lock:
            items = sorted(self._counts.items())
        for (model, status), value in items:
            family.add_sample(REQUEST_COUNT, {"model_name": model, "status": status}, value)
        yield family


class Metrics:
    """The server's metrics and their Prometheus text exposition."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = _CounterCollector()
        self.registry.register(self._requests)
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"], registry=self.registry,
            buckets=LATENCY_BUCKETS_US)
        self.batch_size = Histogram(
            ":tensorflow:serving:batching_session:batch_size",
            "Sizes (after padding) of the batches that server-side batching ran.",
            ["model_name"], registry=self.registry, buckets=BATCH_SIZE_BUCKETS)
        self.queuing_latency = Histogram(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Time (in microseconds) a request waited in the batching queue.",
            ["model_name"], registry=self.registry, buckets=LATENCY_BUCKETS_US)

        # labelled children, cached: ``labels()`` takes a lock and builds a key
        self._latency_children = {}
        self._batch_children = {}
        self._queuing_children = {}

    @staticmethod
    def _child(cache: dict, metric, *labels):
        child = cache.get(labels)
        if child is None:
            child = cache[labels] = metric.labels(*labels)
        return child

    def record_request(self, model_name: str, api: str, entrypoint: str,
                       status: str, seconds: float) -> None:
        """Counts a request by status; its latency only when it succeeded, as
        TF Serving does (``api``: "Predict", "Classify" or "Regress")."""
        self._requests.inc(model_name, status)
        if status == "OK":
            self._child(self._latency_children, self.request_latency,
                        model_name, api, entrypoint).observe(seconds * 1e6)

    def record_batch(self, model_name: str, size: int) -> None:
        self._child(self._batch_children, self.batch_size, model_name).observe(size)

    def record_queuing(self, model_name: str, seconds: float) -> None:
        self._child(self._queuing_children, self.queuing_latency,
                    model_name).observe(seconds * 1e6)

    def exposition(self) -> bytes:
        text = generate_latest(self.registry)
        return text.replace((REQUEST_COUNT + "_total ").encode(), (REQUEST_COUNT + " ").encode())
