"""One background thread that performs every expert read of a policy, most urgent first.

All reads of a policy go through this thread, so the pool never sees two concurrent reads and
reads queue behind each other as they would on one flash device anyway. Demand loads (the engine
is waiting) overtake queued prefetches and swaps; a queued job can be cancelled until it starts.
File reads release the GIL, so the engine thread computes while a read is in progress.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Any, Callable

DEMAND, PREFETCH, BACKGROUND = 0, 1, 2   # priorities, most urgent first


class Loader:
    def __init__(self, name: str = "edgemoe-loader"):
        self._queue: list[tuple[int, int, Future, Callable[[], Any]]] = []
        self._seq = itertools.count()   # FIFO among equal priorities
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], priority: int) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("loader is closed")
            heapq.heappush(self._queue, (priority, next(self._seq), fut, fn))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                _, _, fut, fn = heapq.heappop(self._queue)
            if not fut.set_running_or_notify_cancel():
                continue   # cancelled while queued
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)

    def close(self) -> None:
        """Cancel queued jobs, let a running one finish, stop the thread."""
        with self._cv:
            self._closed = True
            for _, _, fut, _ in self._queue:
                fut.cancel()
            self._queue.clear()
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class VirtualLoader:
    """The Loader's interface on a clock of decode steps, for the planner to drive a real policy
    against a simulated pool: demand loads run at once (whoever submits one waits for it);
    other reads run one after another, in the Loader's order, each taking `read_steps` steps
    from the step after it was queued, when the driver's clock (run_until) passes their end."""

    def __init__(self, read_steps: float):
        self.read_steps = read_steps
        self._queue: list[tuple[int, int, float, Future, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self._free_at = 0.0   # when the one reader is done with what it started

    def submit(self, fn: Callable[[], Any], priority: int) -> Future:
        fut: Future = Future()
        if priority == DEMAND:
            fut.set_running_or_notify_cancel()
            fut.set_result(fn())
        else:
            heapq.heappush(self._queue, (priority, next(self._seq), self.now + 1, fut, fn))
        return fut

    def run_until(self, step: float) -> None:
        """Complete every queued read whose turn ends by `step`; the clock moves to `step`."""
        while self._queue:
            _, _, ready, fut, fn = self._queue[0]
            done = max(self._free_at, ready) + self.read_steps
            if done > step:
                break
            heapq.heappop(self._queue)
            self._free_at = done
            if fut.set_running_or_notify_cancel():
                fut.set_result(fn())
        self.now = step

    def close(self) -> None:
        for _, _, _, fut, _ in self._queue:
            fut.cancel()
        self._queue.clear()
