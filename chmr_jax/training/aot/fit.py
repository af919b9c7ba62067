"""The largest global batch whose compiled step fits a chip's HBM (`chmr-jax compile --fit`).

Each probe compiles the step at one global batch in a SUBPROCESS whose resident memory is watched and
capped (`memory_limit`, default 5 GiB: the compiler's own memory grows with the batch, and one probe
at ~176k molecules once took a 16 GB machine past 7 GiB), under a time limit. Each probe's result is
appended to a JSONL log as soon as it finishes, keyed by the config, topology and sample: running the
same command again reuses the probes already there (resumable). A probe stopped by the host's memory or
time limit says nothing about HBM: it only bounds where the search may go.

The search: the config's batch first (already compiled), then the next guess is where the line through
the two nearest sized probes (a fitting and a refused one when there are both) reaches the compiler's
HBM limit, at most `growth` x the largest fitting batch (bounded steps), never at or above a batch the
host could not compile, always a multiple of 8 x chips; it stops when fitting and refused batches are
within 2% (or one unit), or after `max_probes` compiles. The answer is a BRACKET: largest fitting batch
and smallest refused one. Until the compiler has refused a batch, "largest" is a lower bound and is
printed as one (`bracket_text`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chmr_jax.training.aot.topology import GiB

DEFAULT_MEMORY_LIMIT = 5 * GiB
DEFAULT_TIMEOUT_S = 1800


# ---- one probe in a subprocess -----------------------------------------------------------------------

def _rss(pid: int) -> int:
    """Resident bytes of a process and its children (from /proc; 0 where it cannot be read)."""
    total = 0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for p in [str(pid)] + kids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_limited(cmd: list[str], memory_limit: int, timeout_s: float, env=None, poll_s: float = 0.2) -> dict:
    """Runs `cmd`, stopping it when its resident memory passes `memory_limit` bytes or it runs past
    `timeout_s`. Returns {'returncode', 'stopped': None | 'memory' | 'time', 'peak_rss', 'seconds', 'stderr'}."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        peak, stopped = 0, None
        while proc.poll() is None:
            peak = max(peak, _rss(proc.pid))
            if peak > memory_limit:
                stopped = "memory"
            elif time.monotonic() - t0 > timeout_s:
                stopped = "time"
            if stopped:
                proc.kill()
                proc.wait()
                break
            time.sleep(poll_s)
        err.seek(0)
        tail = err.read()[-4000:].decode(errors="replace")
    return {"returncode": proc.returncode, "stopped": stopped, "peak_rss": peak,
            "seconds": round(time.monotonic() - t0, 1), "stderr": tail}


def probe_in_subprocess(request: dict, workdir: Path, memory_limit: int, timeout_s: float) -> dict:
    """Compiles one batch (request: config, topology, batch, sample file) in a fresh interpreter (its own
    libtpu: nothing is inherited) and returns its probe record."""
    req_path = workdir / f"probe-{request['batch']}.json"
    out_path = workdir / f"probe-{request['batch']}.out.json"
    req_path.write_text(json.dumps({**request, "out": str(out_path)}))
    out_path.unlink(missing_ok=True)
    ran = run_limited([sys.executable, "-m", "chmr_jax.training.aot.fit", str(req_path)], memory_limit, timeout_s)
    record = {"global_batch": request["batch"], "host_peak_rss": ran["peak_rss"], "wall_s": ran["seconds"],
              "memory_limit": memory_limit}
    if ran["stopped"]:
        limit = f"{memory_limit / GiB:.1f} GiB of host memory" if ran["stopped"] == "memory" else f"{timeout_s:.0f} s"
        return {**record, "fits": None, "stopped": f"the compile passed {limit} and was stopped"}
    if ran["returncode"] != 0 or not out_path.exists():
        lines = [ln for ln in ran["stderr"].splitlines() if ln.strip()]
        return {**record, "fits": None, "error": (lines[-1] if lines else f"exit {ran['returncode']}")[:400]}
    row = json.loads(out_path.read_text())
    return {**record, "fits": bool(row["fits"]), "peak_bytes_per_chip": row.get("peak_bytes_per_chip"),
            "per_chip_bytes": row.get("per_chip_bytes"), "hbm_limit_bytes": row.get("hbm_limit_bytes"),
            "compile_s": row.get("compile_s"), "row": row}


def _worker(request_path: str) -> int:
    """Subprocess side of probe_in_subprocess: JAX on CPU, libtpu describing the topology."""
    import jax
    jax.config.update("jax_platforms", "cpu")
    import ml_collections

    from chmr_jax.training.aot import compile as compile_lib, topology
    req = json.loads(Path(request_path).read_text())
    spec = topology.parse_topology(req["topology"])
    topology.quiet_libtpu(spec)
    config = ml_collections.ConfigDict(req["config"])
    with open(req["sample"], "rb") as fh:
        sample = pickle.load(fh)
    row = compile_lib.compile_step(config, spec, req["batch"], sample, log=lambda *a, **k: None)
    Path(req["out"]).write_text(json.dumps(row, default=str))
    return 0


# ---- the log of probes -----------------------------------------------------------------------------

def search_key(config, topology_name: str, sample) -> str:
    """What a probe's result depends on: the config, the topology and the sample's shapes."""
    spec = {"config": config.to_dict(), "topology": topology_name, "sample": sample.shapes_from,
            "molecules": sample.molecules, "n": len(sample.data)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_log(path: Path, key: str, memory_limit: float = float("inf")) -> list[dict]:
    """The probes of this search already in the log (a line that is cut short is skipped; a probe the
    host stopped is retried when the memory limit is now higher)."""
    found = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("key") != key:
                continue
            if rec.get("fits") is not None or (rec.get("stopped") and rec.get("memory_limit", 0) >= memory_limit):
                found.append(rec)
    return found


def append_log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({k: v for k, v in record.items() if k != "row"}, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---- the search ------------------------------------------------------------------------------------

def bracket(probes: list[dict]) -> tuple:
    """(largest fitting probe, smallest refused probe, smallest batch the host could not compile)."""
    fit = [p for p in probes if p.get("fits") is True]
    ref = [p for p in probes if p.get("fits") is False]
    cap = [p["global_batch"] for p in probes if p.get("fits") is None]
    return (max(fit, key=lambda p: p["global_batch"], default=None),
            min(ref, key=lambda p: p["global_batch"], default=None), min(cap, default=None))


def next_batch(probes: list[dict], unit: int, limit: int, growth: float = 4.0) -> int | None:
    """The next batch to compile, or None when the bracket is closed (see the module docstring)."""
    lo, hi, cap = bracket(probes)
    size = lambda p: p.get("peak_bytes_per_chip") or p.get("per_chip_bytes")
    if lo and hi and hi["global_batch"] - lo["global_batch"] <= max(unit, 0.02 * lo["global_batch"]):
        return None
    sized = sorted((p for p in probes if size(p) and p.get("fits") is not None), key=lambda p: p["global_batch"])
    a = b = None
    if lo and hi and size(lo) and size(hi):
        a, b = lo, hi
    elif len([p for p in sized if p["fits"]]) >= 2:
        a, b = [p for p in sized if p["fits"]][-2:]
    guess = None
    if a is not None and b["global_batch"] != a["global_batch"]:
        slope = (size(b) - size(a)) / (b["global_batch"] - a["global_batch"])
        guess = a["global_batch"] + (limit - size(a)) / slope if slope > 0 else None
    if guess is None:
        guess = (lo["global_batch"] + hi["global_batch"]) / 2 if lo and hi else \
            (hi["global_batch"] / 2 if hi else 2 * lo["global_batch"] if lo else unit)
    low = (lo["global_batch"] // unit + 1) * unit if lo else unit     # multiples of the unit above lo
    high = hi["global_batch"] - 1 if hi else float("inf")
    if lo:
        high = min(high, growth * lo["global_batch"])
    if cap is not None:      # the host could not compile `cap`: halve the way there
        high = min(high, ((lo["global_batch"] if lo else 0) + cap) / 2)
    if high < low:
        return None
    guess = int(min(max(guess, low), high) // unit * unit)
    if guess < low or any(p["global_batch"] == guess for p in probes):
        return None
    return guess


def search(probe, first: list[dict], unit: int, limit: int, max_probes: int, growth: float = 4.0, log=print) -> dict:
    """Runs `probe(batch) -> record` from the probes in `first` until next_batch says stop or
    `max_probes` more compiles ran. Returns the bracket and every probe."""
    probes, ran = list(first), 0
    while ran < max_probes:
        b = next_batch(probes, unit, limit, growth)
        if b is None:
            break
        probes.append(probe(b))
        ran += 1
    lo, hi, cap = bracket(probes)
    closed = bool(lo and hi and hi["global_batch"] - lo["global_batch"] <= max(unit, 0.02 * lo["global_batch"]))
    return {"largest_fitting_batch": lo["global_batch"] if lo else None,
            "smallest_refused_batch": hi["global_batch"] if hi else None,
            "host_could_not_compile_batch": cap, "bracket_closed": closed, "hbm_limit_bytes": limit,
            "largest_fitting": {k: v for k, v in (lo or {}).items() if k != "row"}, "probes_run": ran,
            "probes": [{k: v for k, v in p.items() if k != "row"} for p in sorted(probes, key=lambda p: p["global_batch"])]}


def bracket_text(fit: dict, hbm_text: str) -> str:
    """The answer in one line: a batch only when a refusal closed the bracket, else a lower bound."""
    lo, hi, cap = fit["largest_fitting_batch"], fit["smallest_refused_batch"], fit["host_could_not_compile_batch"]
    limit = f"{fit['hbm_limit_bytes'] / GiB:.2f} GiB the compiler allows of {hbm_text}"
    if lo is None:
        return f"largest global batch that fits: none found (smallest refused {hi:,}; {limit})" if hi else \
            "largest global batch that fits: unknown (no probe finished)"
    if fit["bracket_closed"]:
        return f"largest global batch that fits {limit}: {lo:,} (refused at {hi:,}; estimate)"
    why = (f"the compiler refused {hi:,}: rerun with more --max_probes to narrow it" if hi else
           f"no batch refused yet; {cap:,} passed this machine's probe limits" if cap else
           "no batch refused yet: rerun (resumes) or raise --max_probes")
    upper = f"{hi or cap:,}" if (hi or cap) else "?"
    return f"largest global batch that fits {limit}: at least {lo:,}, bracket [{lo:,}, {upper}) ({why})"


def largest_batch(config, spec, sample, devices, first_row: dict, max_probes: int, log_path, memory_limit: int =
                  DEFAULT_MEMORY_LIMIT, timeout_s: float = DEFAULT_TIMEOUT_S, growth: float = 4.0, log=print,
                  on_probe=None) -> dict:
    """The --fit search for `config` on `spec`, from the already compiled `first_row` (the config's batch),
    each further probe in a subprocess (probe_in_subprocess), logged to `log_path` (JSONL; resumed)."""
    log_path = Path(log_path)
    key = search_key(config, spec.topology_name, sample)
    unit = 8 * len(devices)
    limit = first_row["hbm_limit_bytes"]
    first = {"global_batch": first_row["global_batch"], "fits": bool(first_row["fits"]),
             "peak_bytes_per_chip": first_row.get("peak_bytes_per_chip"), "per_chip_bytes": first_row.get("per_chip_bytes"),
             "compile_s": first_row.get("compile_s"), "key": key}
    known = [p for p in read_log(log_path, key, memory_limit) if p["global_batch"] != first["global_batch"]]
    if known:
        log(f"  resuming: {len(known)} probe(s) of this search already in {log_path}")
    else:
        append_log(log_path, first)
    with tempfile.TemporaryDirectory(prefix="chmr-fit-") as tmp:
        workdir = Path(tmp)
        sample_path = workdir / "sample.pkl"
        with open(sample_path, "wb") as fh:
            pickle.dump(sample, fh)
        request = {"config": config.to_dict(), "topology": spec.name, "sample": str(sample_path)}

        def probe(b: int) -> dict:
            rec = {**probe_in_subprocess({**request, "batch": b}, workdir, memory_limit, timeout_s), "key": key}
            append_log(log_path, rec)
            size = rec.get("peak_bytes_per_chip") or rec.get("per_chip_bytes")
            what = ("fits" if rec["fits"] else "refused by the compiler") if rec["fits"] is not None else \
                rec.get("stopped") or rec.get("error")
            log(f"  {spec.topology_name} batch {b:,}: {f'{size / GiB:.2f} GiB per chip, ' if size else ''}{what} "
                f"(host peak {rec['host_peak_rss'] / GiB:.1f} GiB, {rec['wall_s']:.0f} s)", flush=True)
            if on_probe:
                on_probe(rec)
            return rec

        return search(probe, [first] + known, unit, limit, max_probes, growth, log)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
