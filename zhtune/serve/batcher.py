"""One background worker that runs every model call, batching whatever is queued when it becomes free.

Requests (chat rows and correction texts) are queued as :class:`Job`s. The worker waits for work, takes everything
queued (up to ``max_batch`` chat rows; all queued correction texts, which the backend splits into model batches of
its own size), runs the chat rows as one model batch and the corrections as another, and reports to each job through
its ``emit`` callback: ``("delta", text)`` while a chat row streams, then ``("done", result)`` or ``("error",
message)``. A model error fails the jobs of that batch and the worker goes on.

:meth:`Batcher.hold` stops the worker from taking work (what is running finishes); with :meth:`Batcher.wait_queued`
a caller can queue a known number of jobs and release them as one batch — how the tests check batching by counting
model batches rather than by timing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from zhtune.serve.backend import Backend
from zhtune.serve.generation import Row

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A unit of work: ``kind`` ``chat`` (``payload``: prompt ids and their ``SamplingParams``) or ``correct``
    (``payload``: a list of texts). ``emit`` receives the events; ``cancelled`` is set when the requester left."""

    kind: str
    payload: object
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Runs :class:`Job`s on ``backend`` from one worker thread (start it with :meth:`start`)."""

    def __init__(self, backend: Backend, max_batch: int = 32):
        self.backend, self.max_batch = backend, max_batch
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._held = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="zhtune-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker after the batch it is running; queued jobs get an error."""
        with self._cond:
            self._closed = True
            left, self._queue = self._queue, []
            self._cond.notify_all()
        for job in left:
            job.emit(("error", "the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """While inside, the worker takes no new work; on leaving it takes everything queued."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def wait_queued(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` jobs are queued; False if ``timeout`` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) >= count, timeout)

    def run(self, kind: str, payload, on_delta: Callable[[str], None] | None = None):
        """Submit a job and wait for its result (for callers on ordinary threads, like the web page).

        Raises:
            RuntimeError: the model failed on this job's batch.
        """
        events: queue.Queue = queue.Queue()
        self.submit(Job(kind, payload, events.put))
        while True:
            event, value = events.get()
            if event == "delta":
                if on_delta:
                    on_delta(value)
            elif event == "done":
                return value
            else:
                raise RuntimeError(value)

    # -- the worker ---------------------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._queue and not self._held))
            if self._closed:
                return None
            chats = [j for j in self._queue if j.kind == "chat"][: self.max_batch]
            taken = chats + [j for j in self._queue if j.kind != "chat"]
            taken_ids = {id(j) for j in taken}
            self._queue = [j for j in self._queue if id(j) not in taken_ids]
            return taken

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            chats = [j for j in jobs if j.kind == "chat" and not j.cancelled.is_set()]
            corrections = [j for j in jobs if j.kind == "correct"]
            if chats:
                self._guard(chats, self._run_chats)
            if corrections:
                self._guard(corrections, self._run_corrections)

    def _guard(self, jobs: list[Job], fn: Callable[[list[Job]], None]) -> None:
        try:
            fn(jobs)
        except Exception as exc:  # a model failure fails this batch, not the server
            log.exception("model batch of %d job(s) failed", len(jobs))
            for job in jobs:
                job.emit(("error", f"the model failed: {type(exc).__name__}: {exc}"))

    def _run_chats(self, jobs: list[Job]) -> None:
        rows = []
        for job in jobs:
            prompt_ids, params = job.payload
            rows.append(Row(prompt_ids, params, _delta_sender(job), job.cancelled.is_set))
        for job, completion in zip(jobs, self.backend.generate(rows)):
            job.emit(("done", completion))

    def _run_corrections(self, jobs: list[Job]) -> None:
        texts = [text for job in jobs for text in job.payload]
        results, fallbacks = self.backend.correct(texts)
        if fallbacks:
            log.info("corrections: outputs replaced by their source: %s", dict(fallbacks))
        start = 0
        for job in jobs:
            n = len(job.payload)
            job.emit(("done", results[start : start + n]))
            start += n


def _delta_sender(job: Job) -> Callable[[str], None]:
    return lambda text: job.emit(("delta", text))
