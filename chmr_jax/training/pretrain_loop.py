"""The pretraining loop and what it leaves: `pretrain.run` builds the inputs, the model, the state and
the checkpoint stores, then `run_steps` runs the steps (metrics, periodic and epoch checkpoints, the
final one; a SIGTERM/SIGINT stops it after a checkpoint), `check_final_checkpoint` refuses a run whose
last save did not verify, and `summarise` writes summary.json and logs the 'done:' lines.
"""
from __future__ import annotations

import dataclasses
import resource
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from chmr_jax.training import checkpoint as checkpoint_lib, chores as chores_lib, pretrain_data, train, \
    workdir as workdir_lib


class TrainingDiverged(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Run:
    """What every step of a run reads: the config, the workdir, the devices and their 'data' mesh, and
    the two logs (`log` speaks on process 0 only, `log_every_process` on each; process 0 alone writes
    the run's files)."""
    config: Any
    workdir: Path
    devices: list
    mesh: jax.sharding.Mesh
    is_main: bool
    log: Callable
    log_every_process: Callable


@dataclasses.dataclass(frozen=True)
class Stores:
    """The run's checkpoints: the keep-N rotation in checkpoints/ and, when config.train.snapshot_epochs
    names epochs, the snapshots/ kept after them (the rotation never deletes those)."""
    ckpt: checkpoint_lib.Checkpointer
    snapshots: checkpoint_lib.Checkpointer | None
    snapshot_epochs: set

    def close(self) -> None:
        self.ckpt.close()
        if self.snapshots is not None:
            self.snapshots.close()


def run_steps(r: Run, data: pretrain_data.PretrainData, plan: pretrain_data.BatchPlan, step_fn, ctx_device, state,
              start: int, total: int, stores: Stores, chores: chores_lib.Chores, profiler: chores_lib.Profiler,
              meta_common: dict, every_collapse: int, flops_of: Callable) -> tuple[int, dict, str | None]:
    """Steps start..total (or up to a SIGTERM/SIGINT): metrics every config.train.log_every_steps, periodic
    and epoch checkpoints, then the final one. `flops_of(state, batch, base_key, ctx_device)` counts one
    device's FLOPs of a step (pretrain.step_flops), on the first batch; `every_collapse` is the interval
    of the collapse diagnostics (pretrain.collapse_every). Returns (the last step, the last logged
    metrics, the signal that stopped it or None); closes the profiler, chores and stores whatever happens."""
    workdir, tcfg = r.workdir, r.config.train
    ckpt, snapshots, snapshot_epochs = stores.ckpt, stores.snapshots, stores.snapshot_epochs
    base_key = train.step_base_key(tcfg.seed)   # a stream apart from the parameters' and dropout's

    def save(step, store=None, force=False):
        epoch, _ = plan.locate(max(step - 1, 0))
        meta = {"step": step, "epoch": epoch, **meta_common, "totals": chores.totals()}
        if store is snapshots:
            meta["epochs_done"] = epoch + 1
        chores.sync()   # the metrics up to this step are in the workdir with it (gs:// uploads in batches)
        (store or ckpt).save(step, state, meta, force=force)

    last, stop_reason, step = {}, None, start
    with workdir_lib.StopFlag(start, r.log) as stop:
        try:
            for step, epoch, n_mol, batch in pretrain_data.global_batches(data, plan, start, total, r.mesh):
                if step == start:   # tracing only (no compilation)
                    chores.step_flops = flops_of(state, batch, base_key, ctx_device)
                profiler.before_step(step + 1)
                state, metrics = step_fn(state, batch, base_key, ctx_device)   # key: fold_in(base_key, state.step)
                step += 1
                stopping = stop.reached(step)   # (every process calls it at every step)
                profiler.after_step(step, state.step, last=stopping or step == total)
                logged = None
                if chores_lib.itstime(step, tcfg.log_every_steps, total):
                    # Diagnostics not computed on this step (objective.collapse_every; NaN placeholders) are
                    # left out; a NaN computed on a diagnostic step (a non-finite projection) is kept.
                    skipped_diag = step % every_collapse != 0
                    last = {k: v for k, v in train.host_values(metrics).items()
                            if not (skipped_diag and k.startswith("collapse/"))}
                    logged = {**last, "epoch": epoch}   # 'lr': the rate the update used (skips hold it back)
                chores.step_done(step, n_mol, ready=state.step, metrics=logged)
                if logged is not None:
                    if int(last["skipped"]) >= tcfg.max_skipped:
                        save(step, force=True)
                        raise TrainingDiverged(
                            f"{int(last['skipped'])} updates skipped for non-finite loss or gradients (limit "
                            f"config.train.max_skipped={tcfg.max_skipped}); metrics in {workdir / 'metrics.jsonl'}. "
                            "Lower config.optim.lr or check the inputs for NaN/inf")
                if chores_lib.itstime(step, tcfg.checkpoint_every_steps) and step < total:
                    save(step)
                if snapshots is not None and (epoch + 1) in snapshot_epochs and \
                        (step == total or plan.locate(step)[0] != epoch):
                    save(step, snapshots, force=True)
                if stopping:
                    stop_reason = stop.reason
                    break
            # Finished or stopped by a signal: the final checkpoint. (After an exception the
            # periodic checkpoints stand; the state may be mid-update.)
            if step > start and (ckpt.latest_step() or 0) < step:
                save(step, force=True)
        finally:
            profiler.stop()
            chores.close()
            stores.close()
    return step, last, stop_reason


def check_final_checkpoint(r: Run, ckpt: checkpoint_lib.Checkpointer, start: int, step: int) -> None:
    """The run's last checkpoint passed its read-back check (else CorruptCheckpoint: not finished)."""
    if step > start and not (ckpt.directory / str(step)).is_dir():
        # The final save did not verify when read back (moved to corrupt/ by close()): the run is not
        # finished, and a summary naming that checkpoint would send fine-tuning to an older step.
        kept = ckpt.all_steps()
        raise checkpoint_lib.CorruptCheckpoint(
            f"the final checkpoint of step {step} failed its read-back check and was moved to "
            f"{r.workdir / 'corrupt'}; the newest good checkpoint is step {max(kept) if kept else 'none'}: run the "
            "same command again to redo the steps after it")


def peak_memory() -> dict:
    """This process' peak host RSS and, off CPU, its devices' highest peak in use (bytes)."""
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = [d.memory_stats() for d in jax.local_devices() if d.platform != "cpu"]
    peaks = [s.get("peak_bytes_in_use", 0) for s in stats if s]
    if peaks:
        out["device_peak_bytes"] = int(max(peaks))
    return out


def summarise(r: Run, manifest: dict, ckpt: checkpoint_lib.Checkpointer, chores: chores_lib.Chores, compile_time,
              start_digest: str, start: int, step: int, total: int, last: dict, stop_reason: str | None) -> dict:
    """summary.json (pretrain's module docstring says what it holds) written, and the 'done:' lines logged.
    `manifest` is the corpus' manifest. Returns the summary."""
    workdir = r.workdir
    summary = {
        "steps": step, "total_steps": total, "resumed_from": start, "stopped_by": stop_reason,
        "devices": len(r.devices), "platform": r.devices[0].platform, **chores.summary(),
        "init_digest": start_digest,
        # The leakage guard (config.corpus.exclude): molecules left out and their profile rows lost.
        "corpus_excluded": int(manifest.get("counts", {}).get("excluded_leakage", 0)),
        "corpus_excluded_profile_rows": manifest.get("counts", {}).get("excluded_profile_rows", {}),
        **peak_memory(), **compile_time.read(),
        "final_metrics": {k: float(np.asarray(v).mean()) for k, v in last.items()},
        "checkpoint": str(ckpt.directory / str(step)), "workdir": str(workdir)}
    if r.is_main:
        workdir_lib.write_json(workdir / "summary.json", summary)
    mem = summary.get("device_peak_bytes", summary["host_peak_rss_bytes"])
    rate = summary["molecules_per_s"]
    util = summary["utilisation"]
    r.log(f"done: step {step}/{total}, {summary['wall_s']:.1f}s wall over the whole run; "
          f"{rate if rate is not None else 'n/a'} molecules/s after compilation"
          + (f" ({summary['achieved_gflop_per_s']} GFLOP/s, {util:.1%} of this device's matmul rate)" if util is not None else "")
          + f"; peak memory {mem / 2**30:.2f} GiB "
          f"({'device' if 'device_peak_bytes' in summary else 'host RSS'})"
          + (f"; stopped by {stop_reason}" if stop_reason else ""))
    r.log(f"checkpoints: {ckpt.directory}  metrics: {workdir / 'metrics.jsonl'}  tensorboard: {workdir / 'tensorboard'}")
    return summary
