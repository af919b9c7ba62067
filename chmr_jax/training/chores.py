"""The pretraining loop's chores in one place, as big_vision's train loops delegate them: when to log,
checkpoint or snapshot (`itstime`), the progress bar, metric writers on process 0 only, the run's
running totals (wall time, molecules, steady-state time), which are saved with every checkpoint so a
resumed run's summary covers the whole run and not only its last process, a profiler window
(`Profiler`) and the time spent compiling (`CompileTime`).
"""
from __future__ import annotations

import shutil
import threading
import time

import jax

from chmr_jax import progress as progress_lib
from chmr_jax.data import paths
from chmr_jax.training import metric_writers, utilisation


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """Whether a periodic action is due after optimiser step `step` (1-based): every `every` steps and,
    with `total`, at the last step."""
    return bool(every and step % every == 0) or (total is not None and step == total)


TOTALS = ("wall_s", "molecules", "steady_s", "steady_molecules")


class Chores:
    """Progress, metric writing and running totals of one process's part of a run.

    saved_totals: the `totals()` stored with the checkpoint this process resumed from (None for a
    fresh run or a checkpoint written before totals were saved). Time and molecules are counted from
    `t_start` (the start of this process's job, input building included); "steady" excludes each
    process's first step, which is mostly compilation, so molecules/s measures training.
    `step_flops` (the step's FLOPs per device, set by the loop) and `matmul_rate` (this device's dense
    matmul FLOP/s) give the utilisation in the progress line and the summary (this process's steady steps).
    """

    def __init__(self, workdir, total: int, start: int, saved_totals: dict | None, *, is_main: bool,
                 progress: str = "auto", t_start: float | None = None, matmul_rate: float | None = None):
        self.writers = metric_writers.MetricWriters(workdir, resume_step=start or None) if is_main else None
        self.bar = progress_lib.Progress(total, "pretrain", unit="step", log_every_s=30.0, enabled=is_main,
                                         interactive=None if progress == "auto" else progress == "bar",
                                         initial=start)
        self.saved = {k: (saved_totals or {}).get(k, 0) for k in TOTALS}
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.molecules = self.steady_molecules = self.steady_steps = 0
        self.t_first_done: float | None = None
        # The steady steps and time up to the last logged step (its metrics were fetched, so the device had
        # finished it): the progress line and the summary's utilisation both use this one interval, so the
        # final checkpoint's save (after the loop) does not dilute the summary's figure.
        self._synced_steps, self._t_synced = 0, None
        self.step_flops: float | None = None   # set by the loop once the first batch is lowered
        self.matmul_rate = matmul_rate
        # The interval since the previous metrics row (the first row's: since the loop started, so it
        # includes compilation).
        self._row_t, self._row_steps, self._row_molecules = time.perf_counter(), 0, 0
        # The rows' unix "time" is this anchor plus the monotonic clock: row times differ by exactly the
        # intervals step_s is computed from (no wall-clock slew or step between them).
        self._wall_anchor = time.time() - self._row_t

    def step_done(self, step: int, n_molecules: int, ready=None, metrics: dict | None = None) -> None:
        """After optimiser step `step` on `n_molecules` molecules: `metrics` (when it is time to log) go
        to metrics.jsonl and TensorBoard (process 0) and the bar's loss, then the bar advances.
        `ready`: an output of the step, waited for once, after the first step, so the steady-state
        clock starts after compilation."""
        self.molecules += n_molecules
        if self.t_first_done is None:
            if ready is not None:
                jax.block_until_ready(ready)
            self.t_first_done = time.perf_counter()
            self.bar.restart_clock(step)
        else:
            self.steady_molecules += n_molecules
            self.steady_steps += 1
        self._row_steps += 1
        self._row_molecules += n_molecules
        if metrics is not None:
            # Wall time between rows: device compute, host input building (the batches are packed on the
            # host between steps) and dispatch. The loop fetches each row's metrics from the device
            # before writing it, so the interval ends when its last step has finished, not when it was
            # dispatched.
            now = time.perf_counter()
            walltime = self._wall_anchor + now   # the row's "time": this same instant, on the monotonic clock
            interval = now - self._row_t
            metrics = {**metrics, "step_s": interval / self._row_steps,
                       "molecules_per_s": self._row_molecules / interval if interval > 0 else float("nan")}
            self._row_t, self._row_steps, self._row_molecules = now, 0, 0
            self._synced_steps, self._t_synced = self.steady_steps, now
            if self.writers is not None:
                self.writers.write(step, metrics, walltime)
                self.writers.flush()
            if "loss" in metrics:
                util = self.utilisation()["utilisation"]
                self.bar.postfix = f"loss {float(metrics['loss']):.4f}" + (
                    f", {util:.0%} of matmul rate" if util is not None else "")
        self.bar.update(1)

    def totals(self) -> dict:
        """The whole run's totals so far (earlier processes up to their checkpoint, plus this one)."""
        now = time.perf_counter()
        steady = now - self.t_first_done if self.t_first_done is not None else 0.0
        return {"wall_s": round(self.saved["wall_s"] + now - self.t_start, 3),
                "molecules": int(self.saved["molecules"] + self.molecules),
                "steady_s": round(self.saved["steady_s"] + steady, 3),
                "steady_molecules": int(self.saved["steady_molecules"] + self.steady_molecules)}

    def utilisation(self) -> dict:
        """utilisation.report over this process's steady steps (after the compiling first step) up to the
        last logged step: the figure the progress line shows last is the summary's."""
        if self.t_first_done is None or self._t_synced is None:
            return utilisation.report(self.step_flops, 0, 0.0, self.matmul_rate)
        return utilisation.report(self.step_flops, self._synced_steps, self._t_synced - self.t_first_done,
                                  self.matmul_rate)

    def summary(self) -> dict:
        """summary.json's timing fields, over the whole run."""
        t = self.totals()
        rate = t["steady_molecules"] / t["steady_s"] if t["steady_s"] > 0 else None
        return {"molecules_seen": t["molecules"], "wall_s": round(t["wall_s"], 2),
                "molecules_per_s": round(rate, 1) if rate else None, **self.utilisation(), "this_process": {
                    "wall_s": round(time.perf_counter() - self.t_start, 2), "molecules": self.molecules}}

    def sync(self) -> None:
        """The metrics written so far are in the workdir (on gs:// they are uploaded in batches)."""
        if self.writers is not None:
            self.writers.sync()

    def close(self) -> None:
        self.bar.close()
        if self.writers is not None:
            self.writers.close()


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """config.train.profile_steps "a:b" -> (a, b): the optimiser steps a, ..., b-1 (as metrics.jsonl numbers
    them, from 1); '' -> None."""
    if not spec:
        return None
    try:
        first, stop = (int(x) for x in spec.split(":"))
    except ValueError:
        first = stop = 0
    if not 1 <= first < stop:
        raise ValueError(f"config.train.profile_steps={spec!r}: give 'FIRST:STOP' with 1 <= FIRST < STOP (e.g. '5:8' "
                         "traces steps 5, 6 and 7), or '' for no trace")
    return first, stop


class Profiler:
    """A jax.profiler trace of the steps [first, stop) into `logdir` (TensorBoard's profile plugin / xprof
    read it), on the process that makes one (`enabled`: process 0 only, so hosts of a shared workdir do
    not write over each other's traces). A resumed run traces the part of the window it still runs."""

    def __init__(self, window: tuple[int, int] | None, logdir, enabled: bool, log=print):
        self.window = window if enabled else None
        self.logdir, self.log = logdir, log
        self.active = False
        # jax.profiler writes local files: a gs:// workdir's trace is staged locally, copied up in stop(), in
        # an owner-keyed folder under the mirror root (not /tmp), so a killed job's is removed by the next job.
        self.staging = paths.staging_folder() if paths.is_remote(logdir) and self.window else None

    def before_step(self, step: int) -> None:
        """Before optimiser step `step` (1-based) is dispatched."""
        if self.window and not self.active and self.window[0] <= step < self.window[1]:
            jax.profiler.start_trace(str(self.staging or self.logdir))
            self.active, self.first = True, step

    def after_step(self, step: int, ready, last: bool = False) -> None:
        """After step `step` was dispatched (`ready`: one of its outputs, waited for so the trace holds its
        device work); `last`: the loop ends here."""
        if self.active and (step + 1 >= self.window[1] or last):
            jax.block_until_ready(ready)
            self.stop(step)

    def stop(self, step: int | None = None) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.window = False, None
            if self.staging is not None:
                for f in sorted(p for p in self.staging.rglob("*") if p.is_file()):
                    dest = self.logdir / str(f.relative_to(self.staging))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(f.read_bytes())
                shutil.rmtree(self.staging, ignore_errors=True)
            if step is not None:
                self.log(f"profile: steps {self.first}-{step} traced to {self.logdir} (process {jax.process_index()})")


class CompileTime:
    """XLA compilation in this process, from jax.monitoring's events: seconds spent compiling and the
    persistent compilation cache's hits and misses (a hit loads the program instead of compiling it).
    `start()` ... `read()` counts the events in between (the listeners are registered once per process:
    jax.monitoring has no public way to remove them)."""

    _lock = threading.Lock()
    _totals = {"compile_s": 0.0, "hits": 0, "misses": 0}
    _registered = False

    @classmethod
    def _register(cls) -> None:
        with cls._lock:
            if cls._registered:
                return
            cls._registered = True

        def on_duration(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                cls._totals["compile_s"] += duration

        def on_event(event, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                cls._totals["hits"] += 1
            elif event == "/jax/compilation_cache/cache_misses":
                cls._totals["misses"] += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)

    def start(self) -> CompileTime:
        self._register()
        self._at_start = dict(self._totals)
        return self

    def read(self) -> dict:
        """{'compile_s': XLA compile seconds, 'compilation_cache': {'hits': n, 'misses': m}} since start()."""
        d = {k: self._totals[k] - self._at_start[k] for k in self._totals}
        return {"compile_s": round(d["compile_s"], 3), "compilation_cache": {"hits": d["hits"], "misses": d["misses"]}}
