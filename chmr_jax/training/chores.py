"""The pretraining loop's chores in one place, as big_vision's train loops delegate them: when to log,
checkpoint or snapshot (`itstime`), the progress bar, metric writers on process 0 only, and the run's
running totals (wall time, molecules, steady-state time), which are saved with every checkpoint so a
resumed run's summary covers the whole run and not only its last process.
"""
from __future__ import annotations

import time

import jax

from chmr_jax import progress as progress_lib
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
        self.step_flops: float | None = None   # set by the loop once the first batch is lowered
        self.matmul_rate = matmul_rate

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
        if metrics is not None:
            if self.writers is not None:
                self.writers.write(step, metrics)
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
        """utilisation.report over this process's steady steps (after the compiling first step)."""
        steady = time.perf_counter() - self.t_first_done if self.t_first_done is not None else 0.0
        return utilisation.report(self.step_flops, self.steady_steps, steady, self.matmul_rate)

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
