"""Slides made in parallel processes, with their tile progress reported back through a queue.

Workers are spawned, not forked, so the pool is safe beside threads or Ray; each worker gets
the queue once at start-up, and a reader thread in the parent feeds the progress bar.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import queue as queue_module
import threading
from collections.abc import Callable, Sequence

from tqdm import tqdm

from smartccs.synth.slide_job import SlideJob, SlideResult, make_slide

_worker_queue: mp.Queue | None = None


def _init_worker(queue: mp.Queue) -> None:
    global _worker_queue
    _worker_queue = queue


def _make_slide_in_worker(job: SlideJob) -> SlideResult:
    queue = _worker_queue
    assert queue is not None
    return make_slide(job, queue.put)


def make_slides_in_pool(
    jobs: Sequence[SlideJob],
    n_workers: int,
    bar: tqdm,
    finished: Callable[[SlideResult], None],
) -> None:
    """Slides in spawned processes (safe beside threads or Ray), progress through a queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set() or not queue.empty():
            try:
                bar.update(queue.get(timeout=0.2))
            except queue_module.Empty:
                continue

    reader = threading.Thread(target=drain, name="synth-progress", daemon=True)
    reader.start()
    try:
        with cf.ProcessPoolExecutor(
            n_workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)
        ) as pool:
            futures = [pool.submit(_make_slide_in_worker, j) for j in jobs]
            try:
                for fut in cf.as_completed(futures):
                    finished(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        stop.set()
        reader.join()
        queue.close()
