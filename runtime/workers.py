"""Background threads that never hold up Ctrl-C or interpreter exit.

Not concurrent.futures: a Ctrl-C that lands while its executor holds one of its Python-level
locks (the idle semaphore's condition, taken on every submit and by every worker after every
task) leaves that lock held; the workers then block on it and the executor's exit hook joins
them forever (seen: `quantize` printed "interrupted" and never exited). Here the caller takes no
Python-level lock to hand out work or to wait for it (both go through C-level
`queue.SimpleQueue`s), and the threads are daemons, so exit does not wait for work whose
result nobody will read.

    pool = Workers(2, "edgellama-load")
    pending = pool.submit(fn, arg)     # runs on a pool thread
    pending.result()                   # fn's value, or its exception raised here
    pool.map(fn, args)                 # [fn(a) for a in args], the first error raised
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable


class Pending:
    """One submitted call's outcome: `result()` waits for it (once)."""

    __slots__ = ("_box", "_done", "_ok", "_value")

    def __init__(self):
        self._box: queue.SimpleQueue = queue.SimpleQueue()  # the worker puts (ok, value) here
        self._done = False

    def _wait(self) -> tuple[bool, Any]:
        if not self._done:
            self._ok, self._value = self._box.get()
            self._done = True
        return self._ok, self._value

    def result(self) -> Any:
        ok, value = self._wait()
        if not ok:
            raise value
        return value


class Workers:
    """`n` daemon threads named `name-0` ... taking calls from one queue."""

    def __init__(self, n: int, name: str):
        if n < 1:
            raise ValueError(f"Workers needs at least one thread, got {n}")
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()
        for i in range(n):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    @property
    def on_worker(self) -> bool:
        """Whether the calling thread is one of this pool's (a nested map would wait on itself)."""
        return getattr(self._local, "active", False)

    def _work(self) -> None:
        self._local.active = True
        while True:
            fn, args, box = self._tasks.get()
            try:
                box.put((True, fn(*args)))
            except BaseException as exc:  # handed to the caller, which raises it
                box.put((False, exc))
            del fn, args, box  # hold no reference to the last call's arguments while idle

    def submit(self, fn: Callable, *args) -> Pending:
        pending = Pending()
        self._tasks.put((fn, args, pending._box))
        return pending

    def map(self, fn: Callable, items: Iterable) -> list:
        """[fn(item) for item in items], run on the pool's threads, in order; the first error
        (in item order) is raised once every call has ended."""
        pending = [self.submit(fn, item) for item in items]
        outcomes = [p._wait() for p in pending]  # a Ctrl-C while waiting propagates from here
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]


_shared: dict[str, Workers] = {}
_shared_lock = threading.Lock()


def shared(name: str, n: int) -> Workers:
    """The process-wide pool called `name`, started on first use (`n` threads)."""
    pool = _shared.get(name)  # the common case takes no lock
    if pool is not None:
        return pool
    with _shared_lock:
        pool = _shared.get(name)
        if pool is None:
            pool = _shared[name] = Workers(n, name)
        return pool
