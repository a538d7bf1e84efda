"""Saves that return before the file is written: `save_model(..., blocking=False)`.

A save is split in two. On the caller's thread the model is walked and every variable snapshotted
as a zero-copy view of its current buffer (TensorFlow copies a buffer on write while a view holds
it, so training may go on and the views keep this step's values). The file is then written from
those views on a background thread. At most one background save runs: any later kerassave_fast
save or load waits for it first, so calls take effect in the order they were made, and the process
does not exit before it is done (an `atexit` wait).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future

Write = Callable[[], None]

_LOCK = threading.Lock()
_in_flight: Future | None = None  # the background save running now, if any


class SaveHandle:
    """What `save_model(..., blocking=False)` and `save_weights(..., blocking=False)` return.

    `asynchronous` says whether the file is written in the background; when False (a format saved
    by stock or by TensorFlow's own tracing), the save was complete before the call returned.
    """

    def __init__(self, path, future: Future, asynchronous: bool):
        self.asynchronous = asynchronous
        self._future = future
        future.path = path  # the future's, so its failure can be named once the handle is gone
        future.unseen = True  # its error, if it fails, until `result()` or a callback is given it

    @property
    def path(self):
        return self._future.path

    def __del__(self) -> None:
        _warn_if_unseen(self._future)

    def done(self) -> bool:
        """Whether the save has finished, successfully or not."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds (None: as long as it takes); returns `done()`."""
        try:
            self._future.exception(timeout)
        except TimeoutError:
            pass
        return self._future.done()

    def result(self, timeout: float | None = None):
        """Waits for the save; returns what the blocking save returns (None), or raises what it
        raised. `TimeoutError` if it is not done within `timeout` seconds."""
        self._future.unseen = False
        return self._future.result(timeout)

    def add_done_callback(self, callback: Callable[[SaveHandle], object]) -> None:
        """Calls `callback(handle)` once the save has finished (at once if it has), on the thread
        that finished it."""
        self._future.unseen = False
        self._future.add_done_callback(lambda _: callback(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"<SaveHandle {self.path!r} {state}>"


def wait_for_previous() -> None:
    """Waits for the background save in flight, if any (its error stays with its handle)."""
    future = _in_flight
    if future is not None:
        future.exception()


def _warn_if_unseen(future: Future) -> None:
    """Warns, once, of a failed background save whose error no one asked its handle for (a handle
    let go, or held at exit): a blocking save would have raised it."""
    if getattr(future, "unseen", False) and future.done() and future.exception() is not None:
        future.unseen = False
        warnings.warn(
            f"kerassave_fast: the background save to {future.path!r} failed, and its handle was not asked "
            f"(`.result()`): {future.exception()!r}",
            RuntimeWarning,
            stacklevel=2,
        )


def _exit_now(message: str) -> None:
    """Ends the process at once: finalizing the interpreter under a writer thread still inside
    h5py or the Rust core crashes it."""
    with contextlib.suppress(Exception):
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(1)


def _wait_at_exit() -> None:
    """The process does not end before the save in flight is written, nor with its failure unsaid.
    A Ctrl-C or a SIGTERM handler's `SystemExit` does not cut the wait short: the interpreter would
    go on finalizing under the writer thread (a crash, and the temporary file left behind)."""
    interrupted = False
    while _in_flight is not None and _writer is not None and _writer.is_alive():
        try:
            wait_for_previous()
            break
        except (KeyboardInterrupt, SystemExit):
            if interrupted:  # asked twice: gone without the file (its previous content stays)
                _exit_now(f"kerassave_fast: leaving the background save to {_in_flight.path!r} unfinished")
            interrupted = True
            with contextlib.suppress(Exception):  # (stderr may be a closed pipe: the wait goes on)
                path = _in_flight.path
                print(
                    f"kerassave_fast: finishing the background save to {path!r} before exiting "
                    "(interrupt again to leave it unfinished)",
                    file=sys.stderr,
                    flush=True,
                )
    future = _in_flight
    if future is not None:
        _warn_if_unseen(future)


class Deferred:
    """Collects the write of one save, to run it on a background thread (`defer`, then `start`)."""

    def __init__(self):
        self._write: Write | None = None

    @property
    def pending(self) -> bool:
        return self._write is not None

    def defer(self, write: Write) -> None:
        if self._write is not None:
            raise RuntimeError("one save defers one write")
        self._write = write

    def start(self, path, result=None) -> SaveHandle:
        """A handle on the deferred write, started in the background with the caller's context
        variables (`fsync=True` among them); an already finished handle when nothing was deferred."""
        global _in_flight
        future: Future = Future()
        if self._write is None:
            future.set_result(result)
            return SaveHandle(path, future, asynchronous=False)
        write, self._write = self._write, None
        context = contextvars.copy_context()

        def run() -> None:
            nonlocal write
            try:
                context.run(write)
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(result)
            finally:
                write = None  # the views, and the buffers they keep alive, go now

        handle = SaveHandle(path, future, asynchronous=True)
        handle_alive = weakref.ref(handle)
        future.add_done_callback(lambda f: None if handle_alive() is not None else _warn_if_unseen(f))
        with _LOCK:
            wait_for_previous()
            future.set_running_or_notify_cancel()
            try:
                _writer_jobs().put(run)
            except BaseException as e:  # no writer thread (none could be started): nothing will run it
                future.set_exception(e)
                future.unseen = False
                raise
            _in_flight = future
        return handle


_jobs: queue.SimpleQueue | None = None  # the writer thread's, once it runs
_writer: threading.Thread | None = None


def _writer_jobs() -> queue.SimpleQueue:
    """The queue of the one writer thread, started on first use (under `_LOCK`). A thread kept
    waiting costs the caller a `put`, where starting one costs a GIL hand-over or two, which a
    busy machine turns into milliseconds. It is a daemon, so it never holds up the interpreter's
    exit; what does is the `atexit` wait for the save in flight."""
    global _jobs, _writer
    if _jobs is None:
        jobs = queue.SimpleQueue()
        writer = threading.Thread(target=_write_forever, args=(jobs,), name="kerassave_fast writer", daemon=True)
        writer.start()
        _jobs, _writer = jobs, writer
    return _jobs


def _write_forever(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        job()
        del job


def _forget_in_child() -> None:
    """A forked child has no writer thread, and the parent's save in flight is not its own."""
    global _jobs, _writer, _in_flight
    _jobs, _writer, _in_flight = None, None, None


atexit.register(_wait_at_exit)
os.register_at_fork(after_in_child=_forget_in_child)


def write_now(write: Write) -> None:
    write()


def side_by_side(calls: list[Callable[[], object]], workers: int) -> list:
    """Runs `calls` on up to `workers` threads; returns their results in order, or raises the first
    call's error once all have ended. Plain threads, not a `ThreadPoolExecutor`: an executor takes
    no work once the interpreter begins to exit, which is when the `atexit` wait lets a background
    save finish."""
    results: list = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)
    indices = iter(range(len(calls)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(indices, None)
            if i is None:
                return
            try:
                results[i] = calls[i]()
            except BaseException as e:  # raised below, in order
                errors[i] = e

    threads = [
        threading.Thread(target=work, name="kerassave-side-by-side", daemon=True)
        for _ in range(max(1, min(workers, len(calls))))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
