"""Event-loop plumbing: a server on its own thread and loop, and the threads
that run blocking calls for a loop.

:class:`LoopThreadServer` subclasses provide ``_start()`` (a coroutine that binds and starts serving)
and, optionally, ``_cleanup()`` (run on the loop after it stops). ``start()``
returns once the server is up and re-raises a failure to start in the caller.

The loop is uvloop's when it is installed (``event_loop="auto"``): its
callbacks, futures and socket wake-ups cost about a third less CPU than the
stdlib loop's, which on the gRPC front end is the per-request overhead.

:class:`BlockingRunner` is how both front ends hand a blocking call (a session
run, a config reload, a REST request's decoding) to a thread and get the
result back on their loop.
"""
import asyncio
import logging
import queue
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's (``uvloop``, or ``auto`` when importable) or the stdlib's."""
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {kind!r}")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ValueError("event loop 'uvloop' asked for, but uvloop is not installed "
                                 "(pip install uvloop)") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class LoopThreadServer:
    thread_name = "server-loop"

    def __init__(self, event_loop: str = "auto"):
        self._event_loop = event_loop
        self._loop = None
        self._thread = None
        self._started = threading.Event()
        self._error = None

    async def _start(self):  # pragma: no cover - abstract
        raise NotImplementedError

    async def _cleanup(self):
        """Runs on the loop after it stopped; nothing by default."""

    def _run(self):
        self._loop = new_event_loop(self._event_loop)
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 - re-raised by start()
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._cleanup())
        self._loop.close()

    @property
    def loop_kind(self) -> str:
        """"uvloop" or "asyncio": the loop this server runs on (once started)."""
        return "uvloop" if type(self._loop).__module__.startswith("uvloop") else "asyncio"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error


class BlockingRunner:
    """Threads that run blocking calls for an event loop and resolve its futures.

    Lighter than ``loop.run_in_executor``: no concurrent.futures.Future (and so
    no Condition) per call, one queue hand-off in and one
    ``call_soon_threadsafe`` out.  A call whose future is already done when a
    thread picks it up (its caller was cancelled: the client went away or its
    deadline passed) is skipped; its ``on_done`` still runs.
    """

    _STOP = object()

    def __init__(self, threads: int, name: str = "runner"):
        self._queue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, args: tuple, loop: asyncio.AbstractEventLoop,
               fut: asyncio.Future, on_done: Optional[Callable[[], None]] = None) -> None:
        """Runs ``fn(*args)`` on a thread; its result or exception goes to ``fut``
        (on ``loop``); ``on_done`` runs on the thread first."""
        self._queue.put((fn, args, loop, fut, on_done))

    async def call(self, fn: Callable, *args):
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
            result = error = None
            if not fut.done():   # a read of the future's state: safe from this thread
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    error = exc
            if on_done is not None:
                try:
                    on_done()
                except Exception:  # noqa: BLE001
                    log.exception("completion callback failed")
            try:
                loop.call_soon_threadsafe(resolve, fut, result, error)
            except RuntimeError:  # loop closed: the server is gone
                pass
            del item, fn, args, loop, fut, on_done, result, error

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(self._STOP)
        for t in self._threads:
            t.join(timeout=30)


def resolve(fut: asyncio.Future, result, error: Optional[BaseException]) -> None:
    """On the future's loop: its result or exception, unless its caller went away."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
