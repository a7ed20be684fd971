"""Background sampling while a benchmark measurement runs: memory and CPU time of every
process, the object store and, with a GPU, how busy it is (``bench/screening.py``,
``bench/full_slide.py``); and exact CPU time by process around a window too short to sample
(``bench/load.py``'s bursts)."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import ray


def _title(p: Any) -> str:
    """A Ray worker's title (``ray::Class.method``) or a program's name."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0]
    return Path(cmd[0]).name if cmd else p.name()


def cpu_times() -> dict[int, tuple[str, float]]:
    """CPU-seconds so far of this process (titled ``driver``) and of each descendant, by pid:
    exact at both ends of a window too short for :class:`Monitor`'s 0.2 s sampling."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = ("driver" if p.pid == me.pid else _title(p), t.user + t.system)
    return out


def cpu_spent(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU-seconds by process title between two :func:`cpu_times` (a process born between
    them counts from zero; one that exited between them is missed)."""
    spent: dict[str, float] = {}
    for pid, (title, cpu) in after.items():
        spent[title] = spent.get(title, 0.0) + cpu - before.get(pid, (title, 0.0))[1]
    kept = [(k, round(v, 3)) for k, v in spent.items() if v > 0]
    return dict(sorted(kept, key=lambda kv: -kv[1]))


class Monitor:
    """Background sampling while a measurement runs: memory every 0.2 s, the object store
    every 0.5 s and, with a GPU, how busy it is every 0.1 s.

    Memory is RSS: this process (the driver, which here also holds the bench's own tiles and
    models), every descendant titled ``ray::`` (Ray's workers and actors, idle ones
    included), and every descendant at all (plus GCS, raylet, dashboard). Pages shared
    between processes (libraries, mapped objects) count once per process, so sums are upper
    bounds. The object store's bytes in use come from the raylet's memory-info reply (the
    stats ``ray memory --stats-only`` prints; a private Ray API, about 10 ms a call).
    """

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.peak = {"driver": 0, "workers": 0, "driver_workers": 0, "all": 0, "store": 0}
        self.peak_process = (0, "")  # the largest single worker process: RSS, title
        self.cpu: dict[str, float] = {}  # CPU-seconds spent while sampled, by process title
        self._last_cpu: dict[int, float] = {}
        self.sampler_cpu = 0.0  # what the sampling itself cost this process
        self._since = time.time()
        self.store_sampled = False
        self.gpu_samples: list[float] = []
        self.gpu_method: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Monitor:
        targets = [self._memory, self._object_store] + ([self._gpu] if self.gpu else [])
        self._threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _keep(self, key: str, value: int) -> None:
        self.peak[key] = max(self.peak[key], value)

    def _memory(self) -> None:
        """RSS peaks, and CPU time by process title: each sample's CPU growth is charged to
        the title the process has then (a Ray worker is renamed for every task it runs)."""
        import psutil  # Ray ships it (ray/thirdparty_files), importable once ray is

        me = psutil.Process()
        started = time.thread_time()
        while True:
            driver = me.memory_info().rss
            self._charge(me, "driver")
            workers = others = 0
            for p in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss
                    title = _title(p)
                    if title.startswith("ray::"):
                        workers += rss
                        self.peak_process = max(self.peak_process, (rss, title))
                    else:
                        others += rss
                    self._charge(p, title)
            self._keep("driver", driver)
            self._keep("workers", workers)
            self._keep("driver_workers", driver + workers)
            self._keep("all", driver + workers + others)
            self.sampler_cpu = time.thread_time() - started
            if self._stop.wait(0.2):
                return

    def _charge(self, p: Any, title: str) -> None:
        t = p.cpu_times()
        cpu = t.user + t.system
        before = self._last_cpu.get(p.pid)
        if before is None and p.create_time() >= self._since:  # born during the measurement
            before = 0.0
        self._last_cpu[p.pid] = cpu
        if before is not None:
            self.cpu[title] = self.cpu.get(title, 0.0) + cpu - before

    def _object_store(self) -> None:
        if not ray.is_initialized():
            return
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while True:
            with contextlib.suppress(Exception):  # private API: no figure rather than a crash
                used = get_memory_info_reply(state).store_stats.object_store_bytes_used
                self._keep("store", int(used))
                self.store_sampled = True
            if self._stop.wait(0.5):
                return

    def _gpu(self) -> None:
        import torch

        try:
            torch.cuda.utilization()
        except Exception:  # no pynvml: the same NVML counter through nvidia-smi
            self._nvidia_smi()
            return
        self.gpu_method = "torch.cuda.utilization (NVML), every 0.1 s"
        while not self._stop.wait(0.1):
            self.gpu_samples.append(float(torch.cuda.utilization()))

    def _nvidia_smi(self) -> None:
        self.gpu_method = "nvidia-smi -i 0 --query-gpu=utilization.gpu -lms 100"
        cmd = ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu"]
        cmd += ["--format=csv,noheader,nounits", "-lms", "100"]
        smi = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert smi.stdout is not None
            for line in smi.stdout:  # a line every 0.1 s, so a stop is seen within that
                with contextlib.suppress(ValueError):
                    self.gpu_samples.append(float(line.strip()))
                if self._stop.is_set():
                    break
        finally:
            smi.terminate()
            smi.wait()

    def report(self) -> dict[str, Any]:
        mb = {k: v / 2**20 for k, v in self.peak.items()}
        return {
            "peak_rss_mb": mb["driver_workers"],
            "peak_driver_rss_mb": mb["driver"],
            "peak_workers_rss_mb": mb["workers"],
            "peak_all_ray_rss_mb": mb["all"],
            "peak_object_store_mb": mb["store"] if self.store_sampled else None,
            "peak_worker_process_rss_mb": self.peak_process[0] / 2**20,
            "peak_worker_process": self.peak_process[1],
            "cpu_s_by_process": dict(sorted(self.cpu.items(), key=lambda kv: -kv[1])),
            "sampler_cpu_s": self.sampler_cpu,
            "gpu_busy": statistics.fmean(self.gpu_samples) / 100 if self.gpu_samples else None,
            "gpu_samples": len(self.gpu_samples),
            "gpu_method": self.gpu_method,
        }
