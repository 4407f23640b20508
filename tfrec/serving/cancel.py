"""Stops a running model call once nobody waits for its answer.

A client whose deadline passed or who cancelled still held a worker thread and the CPU
until its model call ended, so a few clients with short deadlines starved the rest. TF
Serving bounds a Session run by the gRPC deadline; the eager equivalent is a
CancellationManager, which aborts a running function between kernels and loop steps.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional, TypeVar

from tensorflow.python.eager import cancellation

T = TypeVar("T")

_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _install() -> None:
    """Makes TF's "active cancellation manager" per thread.

    TF keeps it in one module global read when a function is called, so two server
    threads setting it at once would cancel each other's calls. The global still wins
    when set (TF's own `get_cancelable_function` users).
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        global_context = cancellation.context

        def thread_context():
            return global_context() or getattr(_local, "manager", None)

        cancellation.context = thread_context
        _installed = True


class CallStopped(Exception):
    """A call run by `Canceller.run` failed because `cancel()` stopped it."""


class Canceller:
    """One model call's cancellation: `cancel()` from any thread stops the call.

    Calls made inside `scope()` on the calling thread are the ones stopped; `cancel()`
    before the call starts makes it fail at once.
    """

    def __init__(self):
        _install()
        self._manager = cancellation.CancellationManager()
        self._requested = False

    @property
    def cancelled(self) -> bool:
        """`cancel()` was called (TF also cancels the manager itself when an op fails)."""
        return self._requested

    def cancel(self, *unused) -> None:
        """Stops the call (idempotent; extra arguments let it be any callback)."""
        self._requested = True
        self._manager.start_cancel()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """TF function calls on this thread inside the block are stopped by `cancel()`."""
        previous: Optional[cancellation.CancellationManager] = getattr(_local, "manager", None)
        _local.manager = self._manager
        try:
            yield
        finally:
            _local.manager = previous

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` inside `scope()`; a failure caused by `cancel()` becomes CallStopped.

        Raises:
          CallStopped: `cancel()` was called and the call failed (TF raises a
            CancelledError, or whatever op was running when it stopped).
          Exception: anything `fn` raised on its own.
        """
        try:
            with self.scope():
                return fn(*args)
        except Exception as e:
            if self.cancelled:
                raise CallStopped(str(e)) from e
            raise

