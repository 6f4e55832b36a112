"""One loaded SavedModel version: its own tf.Graph + tf.compat.v1.Session.

Loads exactly as TF Serving's session-based path does
(``tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)``) and runs
signatures by tensor name (through Session callables).  ``scann`` is imported first so SavedModels with the
``Scann>*`` ops load.  Requests hold the servable with :meth:`acquire` /
:meth:`release`; :meth:`close` waits for them before closing the session.
"""
import logging
import os
import threading
from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

from serving.signature import Signature

log = logging.getLogger(__name__)

try:  # registers the Scann>* custom ops before any graph is imported
    import scann  # noqa: F401
except ImportError:  # pragma: no cover - scann is part of the pinned stack
    log.warning("scann is not importable: ScaNN SavedModels will not load")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def session_config(intra_op: int = 0, inter_op: int = 0) -> tf.compat.v1.ConfigProto:
    """Session options.

    ``intra_op`` 0 = the cores this process may use (not the machine's).
    ``inter_op`` 0 = run each graph's ops in the calling thread (TensorFlow's
    negative setting): the server already runs requests and batches on their
    own threads, so a shared inter-op pool only adds a thread hand-off (and
    idle spinning) per run; > 0 sizes that pool, < 0 is passed through.
    Sessions share TensorFlow's process-wide pools, so versions and models do
    not multiply threads; the first session's sizes apply.
    """
    cores = usable_cores()
    return tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_op or cores,
        inter_op_parallelism_threads=inter_op or -1,
        allow_soft_placement=True,
    )


class Servable:
    """A loaded model version, runnable by SignatureDef alias."""

    def __init__(self, name: str, version: int, path: str,
                 config: Optional[tf.compat.v1.ConfigProto] = None):
        self.name = name
        self.version = version
        self.path = path
        self._config = config
        self.graph = None
        self.session = None
        self.signature_defs = {}
        self.signatures = {}
        self._callables = {}
        self._callables_lock = threading.Lock()
        self._inflight = 0
        self._cv = threading.Condition()

    def load(self) -> "Servable":
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph, config=self._config)
        try:
            with self.graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(
                    self.session, ["serve"], self.path)
        except BaseException:
            self.session.close()
            raise
        self.signature_defs = dict(meta_graph.signature_def)
        self.signatures = {k: Signature(k, s) for k, s in self.signature_defs.items()}
        return self

    # -- running ----------------------------------------------------------
    def _callable(self, signature: Signature, output_aliases: tuple):
        """A ``Session`` callable (``CallableOptions``: feeds and fetches by
        tensor name) for all of the signature's inputs and these outputs.

        It runs through ``TF_SessionRunCallable`` directly: no feed dict, no
        fetch handler, no graph lookups per call (``Session.make_callable``
        with a ``feed_list`` falls back to a full ``Session.run``).
        """
        key = (signature.key, output_aliases)
        entry = self._callables.get(key)
        if entry is None:
            with self._callables_lock:
                entry = self._callables.get(key)
                if entry is None:
                    options = config_pb2.CallableOptions()
                    options.feed.extend(signature.inputs[a].name
                                        for a in signature.input_aliases)
                    options.fetch.extend(signature.outputs[a].name for a in output_aliases)
                    fn = self.session._make_callable_from_options(options)
                    dtypes = [np.dtype(signature.inputs[a].np_dtype)
                              for a in signature.input_aliases]
                    entry = self._callables[key] = (fn, dtypes)
        return entry

    def run(self, signature: Signature, arrays: dict, output_aliases: tuple) -> dict:
        """Runs ``signature`` on ``arrays`` (alias -> ndarray); returns alias -> ndarray."""
        if len(arrays) == len(signature.inputs):
            fn, dtypes = self._callable(signature, output_aliases)
            feeds = []
            for alias, dtype in zip(signature.input_aliases, dtypes):
                arr = arrays[alias]
                if arr.dtype != dtype or not arr.flags.c_contiguous:
                    arr = np.ascontiguousarray(arr, dtype=dtype)
                feeds.append(arr)
            values = fn(*feeds)
        else:  # some inputs left to their defaults
            values = self.session.run(
                [signature.outputs[a].name for a in output_aliases],
                {signature.inputs[a].name: v for a, v in arrays.items()})
        return dict(zip(output_aliases, values))

    # -- lifetime ---------------------------------------------------------
    def acquire(self) -> None:
        with self._cv:
            self._inflight += 1

    def release(self) -> None:
        with self._cv:
            self._inflight -= 1
            if self._inflight == 0:
                self._cv.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Waits for in-flight requests, then closes the session."""
        with self._cv:
            self._cv.wait_for(lambda: self._inflight == 0, timeout=timeout)
        if self.session is not None:
            self.session.close()
            self.session = None
