"""Generations on worker threads: at most N run at once, the rest wait in a FIFO queue.

The Model is shared read-only; each job builds its own Generation (KV cache, IO
binding, sampler, detokenizer) on the worker thread that runs it, so token ids never
cross between requests. Steps travel to the event loop through the job's asyncio
queue. A cancelled job (its client went away) never starts if it is still queued, and
stops before its next token if it is running, freeing its worker.

With a PromptCache, a job's decoder starts from the longest cached prefix of its prompt (a
copy, or an entry no other job can get while this one has it) and goes back to the cache
when the job ends or is cancelled between tokens; one whose generation raised is dropped.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import AsyncIterator, Sequence

from edgellama.runtime.generate import Generation, GenerationConfig, Step
from edgellama.runtime.model import Model
from edgellama.runtime.prompt_cache import PromptCache

from .protocol import APIError, Done

SHUTTING_DOWN = "the server is shutting down; retry against a running server"


class Job:
    """One request's generation, as seen from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()  # Step, then Done or an exception
        self._stop = threading.Event()
        self.future: Future | None = None

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        """Idempotent; safe after the job ended."""
        self._stop.set()
        if self.future is not None:
            self.future.cancel()  # only takes effect while queued

    def put(self, item: Step | Done | BaseException) -> None:  # from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody listens
            self._stop.set()

    async def events(self) -> AsyncIterator[Step | Done | BaseException]:
        """Steps, then one Done, or what the worker raised (not raised here: the caller
        tells generation errors from its own)."""
        while True:
            item = await self._events.get()
            yield item
            if not isinstance(item, Step):
                return


class Engine:
    def __init__(self, model: Model, max_concurrent: int, cache: PromptCache | None = None,
                 speculation: dict | None = None):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.model, self.max_concurrent, self.cache = model, max_concurrent, cache
        self.speculation = speculation or {}  # the server's --speculate, applied to every request
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="edgellama-generate")
        self._lock = threading.Lock()
        # Counters for /health and tests: jobs waiting, running, and how jobs ended.
        self.queued = self.running = self.finished = self.cancelled = self.failed = 0
        self._jobs: set[Job] = set()  # not yet ended
        self._closed = False

    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Job:
        job = Job(asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise APIError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down")
            self.queued += 1
            self._jobs.add(job)
        job.future = self._pool.submit(self._work, job, list(prompt_ids), config)
        job.future.add_done_callback(lambda future: self._ended(job, future))
        return job

    def stats(self) -> dict:
        with self._lock:
            return {"queued": self.queued, "running": self.running, "max_concurrent": self.max_concurrent,
                    "finished": self.finished, "cancelled": self.cancelled, "failed": self.failed}

    def close(self) -> None:
        """Refuse new jobs and end every job: queued ones never start, running ones stop at
        their next token, and their requests are answered 503. Any thread."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
            job.put(APIError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _ended(self, job: Job, future: Future) -> None:
        with self._lock:
            self._jobs.discard(job)
            if future.cancelled():  # left the queue without running
                self.queued -= 1
                self.cancelled += 1

    def _work(self, job: Job, prompt_ids: list[int], config: GenerationConfig) -> None:
        with self._lock:
            self.queued -= 1
            self.running += 1
        outcome = "failed"
        try:
            outcome = self._generate(job, prompt_ids, config)
        except BaseException as exc:  # reported to the request, which answers with an error
            job.put(exc)
        finally:
            with self._lock:
                self.running -= 1
                setattr(self, outcome, getattr(self, outcome) + 1)

    def _generate(self, job: Job, prompt_ids: list[int], config: GenerationConfig) -> str:
        if job.cancelled:
            return "cancelled"
        gen, cached = self._start(prompt_ids, config)
        for step in gen:
            if job.cancelled:
                self._keep(gen)  # between tokens: its cache holds exactly what it has fed
                return "cancelled"
            job.put(step)
        self._keep(gen)  # before Done: the client's next turn, sent on receiving it, finds it
        job.put(Done(gen.finish_reason, gen.prompt_tokens, gen.completion_tokens, cached))
        return "finished"

    def _start(self, prompt_ids: list[int], config: GenerationConfig) -> tuple[Generation, int]:
        config = replace(config, **self.speculation)
        """The generation, and how many of its prompt tokens come from the cache."""
        if self.cache is None:
            return self.model.generate(prompt_ids, config), 0
        decoder = self.cache.decoder_for(prompt_ids, len(prompt_ids) + config.max_new_tokens)
        return Generation(self.model, prompt_ids, config, decoder=decoder), decoder.cache.length

    def _keep(self, gen: Generation) -> None:
        if self.cache is not None:
            self.cache.store(gen.decoder)
