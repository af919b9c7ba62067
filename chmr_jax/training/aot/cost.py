"""What a compiled TPU program costs per chip, read from its HLO proto (hlo.py): XLA:TPU's own cycle
estimate, bytes moved (all memories and HBM alone, attributed to our source lines for tuning), bytes sent
over the inter-chip interconnect, the loops and their trip counts, host calls. FLOPs are not counted here:
utilisation.program_flops is the one FLOP counter.

Every top-level instruction (a fusion as one) counts once per execution: the entry computation's and,
through while / call / conditional, those of the computations they run, times the trip counts of the
loops around them. XLA's own cost analysis counts each loop body once; this walk multiplies.
- cycles: the `estimated_cycles` XLA:TPU writes into each instruction's backend_config (its cost model
  of that fusion / copy / convert on this chip); instructions without one (async copies, collectives,
  bookkeeping) are counted in `uncosted`.
- bytes: operands read plus result written, at the arrays' tile-padded sizes; a slice / dynamic-slice /
  gather (also inside a fusion, where its parameter feeds nothing else) reads only what it outputs; a
  dynamic-update-slice reads and writes its update; an in-place fusion (output_operand_aliasing) does not
  write its output again. An asynchronous pair X-start / X-done reads X-start's operands and writes
  X-done's result: a copy-start from HBM into on-chip memory (a prefetch) reads HBM and writes on-chip
  memory, an eviction the other way round. hbm_bytes leaves out arrays in on-chip memory (memory_space
  >= 1).
- ici_bytes: what each chip sends for its collectives with g participants: all-reduce 2 (g-1)/g x its
  operand, all-gather (g-1) x its operand, reduce-scatter / all-to-all (g-1)/g x its operand,
  collective-permute its operand (ring algorithms; logical, unpadded sizes).
- loops: a while loop's trip count is XLA's known_trip_count where it wrote one, else read from the
  loop itself: the condition compares the induction variable with a constant (<, <=, >, >=, !=), its
  initial value is a constant of the loop's input tuple, the body adds a constant step. A loop whose
  count cannot be read that way (a data-dependent condition, such as an eigensolver's convergence test)
  is counted once AND listed in `unknown_trip_loops`: the totals are then lower bounds.
"""
from __future__ import annotations

import dataclasses
import math
import re

from chmr_jax.training.aot import hlo

# Instructions that move no bytes of their own (views, bookkeeping) or whose cost is their callee's.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier", "add-dependency", "call", "while", "conditional", "domain"}
PARTIAL_READS = {"slice", "dynamic-slice", "gather"}     # operand 0 read only where the output says
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "ragged-all-to-all", "collective-broadcast"}
HOST_TARGETS = ("callback", "host", "python")
_PASSTHROUGH = {"copy", "bitcast", "convert", "reshape"}


@dataclasses.dataclass
class Cost:
    bytes: float = 0.0
    hbm_bytes: float = 0.0
    cycles: float = 0.0
    ici_bytes: float = 0.0
    uncosted: float = 0.0                  # executions of instructions without an estimated_cycles
    by_source: dict = dataclasses.field(default_factory=dict)    # hbm bytes by source line
    by_kind: dict = dataclasses.field(default_factory=dict)      # hbm bytes by instruction name stem
    loops: list = dataclasses.field(default_factory=list)

    def add(self, other: "Cost", times: float = 1.0) -> None:
        for f in ("bytes", "hbm_bytes", "cycles", "ici_bytes", "uncosted"):
            setattr(self, f, getattr(self, f) + getattr(other, f) * times)
        for mine, theirs in ((self.by_source, other.by_source), (self.by_kind, other.by_kind)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v * times
        self.loops += [{**lp, "runs": lp["runs"] * times} for lp in other.loops]


def estimated_cycles(ins) -> float | None:
    """XLA:TPU's estimated_cycles of a top-level instruction (anywhere in its backend_config), or None."""
    def find(x):
        if isinstance(x, dict):
            if "estimated_cycles" in x:
                return x["estimated_cycles"]
            x = list(x.values())
        if isinstance(x, list):
            for v in x:
                found = find(v)
                if found is not None:
                    return found
        return None
    value = find(hlo.backend_config(ins))
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def group_size(ins, n_devices: int) -> int:
    """Participants of a collective: its first replica group's size (explicit or iota), else all devices."""
    lists = ins.collective_device_list
    if lists.replica_groups:
        return len(lists.replica_groups[0].replica_ids) or n_devices
    if lists.HasField("iota_replica_group_list") and lists.iota_replica_group_list.num_devices_per_group:
        return int(lists.iota_replica_group_list.num_devices_per_group)
    if ins.replica_groups:
        return len(ins.replica_groups[0].replica_ids) or n_devices
    return n_devices


def ici_bytes(op: str, operand_bytes: float, g: int) -> float:
    """Bytes one chip sends for collective `op` over g participants (ring algorithms)."""
    if g <= 1:
        return 0.0
    if op == "all-reduce":
        return 2.0 * (g - 1) / g * operand_bytes
    if op == "all-gather":
        return (g - 1) * operand_bytes
    if op in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (g - 1) / g * operand_bytes
    return operand_bytes     # collective-permute, collective-broadcast


def _fusion_partial_reads(m: hlo.Module, fused_id: int) -> dict:
    """{parameter number: bytes read} for a fused computation's parameters whose every use is the first
    operand of a slice / dynamic-slice / gather (they read the output's size, not the whole array)."""
    comp = m.computation(fused_id)
    params = {i.id: i.parameter_number for i in comp.instructions if i.opcode == "parameter"}
    uses = {pid: [] for pid in params}
    for i in comp.instructions:
        for k, o in enumerate(i.operand_ids):
            if o in uses:
                uses[o].append((i, k))
    return {params[pid]: sum(hlo.nbytes(u.shape) for u, _ in us) for pid, us in uses.items()
            if us and all(u.opcode in PARTIAL_READS and k == 0 for u, k in us)}


def instruction_cost(m: hlo.Module, ins, n_devices: int) -> Cost:
    """One execution of a top-level, non-control-flow instruction (see the module docstring)."""
    c = Cost()
    op = ins.opcode
    cycles = estimated_cycles(ins)
    if cycles is None:
        c.uncosted = 1.0
    else:
        c.cycles = cycles
    if op in FREE or (op == "custom-call" and ins.custom_call_target in ("ConcatBitcast", "AllocateBuffer")):
        return c
    operands = m.operands(ins)
    out_all, out_hbm = hlo.nbytes(ins.shape), hlo.nbytes(ins.shape, True)
    if op.endswith("-done"):             # writes the asynchronous operation's result
        c.bytes, c.hbm_bytes = out_all, out_hbm
    elif op.endswith("-start"):          # reads its operands
        c.bytes = sum(hlo.nbytes(o.shape) for o in operands)
        c.hbm_bytes = sum(hlo.nbytes(o.shape, True) for o in operands)
    elif op in PARTIAL_READS and operands:
        first_hbm = out_all if hlo.nbytes(operands[0].shape, True) else 0.0
        c.bytes = 2 * out_all + sum(hlo.nbytes(o.shape) for o in operands[1:])
        c.hbm_bytes = out_hbm + first_hbm + sum(hlo.nbytes(o.shape, True) for o in operands[1:])
    elif op == "dynamic-update-slice" and len(operands) > 1:
        upd = hlo.nbytes(operands[1].shape)
        c.bytes = 2 * upd
        c.hbm_bytes = hlo.nbytes(operands[1].shape, True) + (upd if out_hbm else 0.0)
    else:
        reads_all = [hlo.nbytes(o.shape) for o in operands]
        reads_hbm = [hlo.nbytes(o.shape, True) for o in operands]
        if op == "fusion" and ins.called_computation_ids:
            for i, limited in _fusion_partial_reads(m, ins.called_computation_ids[0]).items():
                if i < len(reads_all):
                    reads_hbm[i] = min(reads_hbm[i], limited) if reads_hbm[i] else 0.0
                    reads_all[i] = min(reads_all[i], limited)
        aliased = len(ins.output_operand_aliasing) > 0
        c.bytes = sum(reads_all) + (0.0 if aliased else out_all)
        c.hbm_bytes = sum(reads_hbm) + (0.0 if aliased else out_hbm)
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base in COLLECTIVES:
        c.ici_bytes = ici_bytes(base, sum(hlo.nbytes(o.shape, padded=False) for o in operands),
                                group_size(ins, n_devices))
    source = m.source(ins) or op
    c.by_source[source] = c.hbm_bytes
    c.by_kind[re.sub(r"(\.\d+)+$", "", ins.name)] = c.hbm_bytes
    return c


# ---- loops ---------------------------------------------------------------------------------------------

def _value(m: hlo.Module, ins, env: dict, depth: int = 0):
    """('const', v), ('iv', tuple index of the loop state) or None, for a scalar in a loop condition or
    body: through copies / converts, fusions (into their fused root) and get-tuple-element of the state."""
    if depth > 20:
        return None
    op = ins.opcode
    if op == "constant":
        lit = ins.literal
        for field in ("s32s", "s64s", "u32s", "u64s"):
            vals = list(getattr(lit, field))
            if len(vals) == 1:
                return ("const", int(vals[0]))
        return None
    if op == "parameter" and ins.id in env:
        return _value(m, env[ins.id][0], env[ins.id][1], depth + 1) if env[ins.id] is not None else None
    if op == "get-tuple-element":
        src = m.operands(ins)[0]
        if src.opcode == "parameter" and src.id not in env:
            return ("iv", int(ins.tuple_index))
        return None
    if op in _PASSTHROUGH and ins.operand_ids:
        return _value(m, m.operands(ins)[0], env, depth + 1)
    if op == "fusion" and ins.called_computation_ids:
        fused = m.computation(ins.called_computation_ids[0])
        outer = m.operands(ins)
        inner = {p.id: (outer[p.parameter_number], env) for p in fused.instructions
                 if p.opcode == "parameter" and p.parameter_number < len(outer)}
        return _value(m, m.root(fused.id), inner, depth + 1)
    return None


def trip_count(m: hlo.Module, ins) -> tuple[int | None, str]:
    """(trips, '') of a while instruction, or (None, why not)."""
    known = hlo.backend_config(ins).get("known_trip_count", {})
    if isinstance(known, dict) and str(known.get("n", "")).isdigit():
        return int(known["n"]), ""
    comps = [m.computation(c) for c in ins.called_computation_ids]
    cond = next((c for c in comps if m.root(c.id).shape.element_type == 1 and not m.root(c.id).shape.dimensions), None)
    body = next((c for c in comps if cond is None or c.id != cond.id), None)
    if cond is None or body is None:
        return None, "no condition / body computation"
    root = m.root(cond.id)
    env = {}
    while root.opcode == "fusion" and root.called_computation_ids:   # a fused compare: look inside
        fused = m.computation(root.called_computation_ids[0])
        outer = m.operands(root)
        env = {p.id: (outer[p.parameter_number], {}) for p in fused.instructions
               if p.opcode == "parameter" and p.parameter_number < len(outer)}
        root = m.root(fused.id)
    if root.opcode != "compare":
        return None, f"the condition's root is {root.opcode}, not a comparison"
    a, b = (_value(m, o, env) for o in m.operands(root))
    direction = root.comparison_direction or "?"
    if a and b and a[0] == "const" and b[0] == "iv":       # c > iv  ==  iv < c
        a, b = b, a
        direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction, direction)
    if not (a and b and a[0] == "iv" and b[0] == "const"):
        return None, "the condition does not compare a loop counter with a constant"
    k, bound = a[1], b[1]
    init_tuple = m.operands(ins)[0] if ins.operand_ids else None
    init = _value(m, m.operands(init_tuple)[k], {}) if init_tuple is not None and init_tuple.opcode == "tuple" \
        and k < len(init_tuple.operand_ids) else None
    if not init or init[0] != "const":
        return None, "the counter's initial value is not a constant"
    body_root = m.root(body.id)
    step = None
    if body_root.opcode == "tuple" and k < len(body_root.operand_ids):
        upd = m.operands(body_root)[k]
        while upd.opcode in _PASSTHROUGH and upd.operand_ids:
            upd = m.operands(upd)[0]
        if upd.opcode in ("add", "subtract") and len(upd.operand_ids) == 2:
            x, y = (_value(m, o, {}) for o in m.operands(upd))
            if x == ("iv", k) and y and y[0] == "const":
                step = y[1] if upd.opcode == "add" else -y[1]
            elif upd.opcode == "add" and y == ("iv", k) and x and x[0] == "const":
                step = x[1]
    if not step:
        return None, "the body does not step the counter by a constant"
    start = init[1]
    span = {"LT": bound - start, "LE": bound - start + 1, "NE": bound - start,
            "GT": start - bound, "GE": start - bound + 1}.get(direction)
    if span is None or (direction in ("LT", "LE", "NE") and step < 0) or (direction in ("GT", "GE") and step > 0):
        return None, f"comparison {direction} with step {step}"
    return max(0, math.ceil(span / abs(step))), ""


# ---- the walk ----------------------------------------------------------------------------------------------

def program_cost(serialized: bytes, n_devices: int = 1, conditional: str = "max") -> dict:
    """Per-chip totals of a serialized compiled module (see the module docstring). A conditional runs one
    branch: `conditional` 'max' charges the one moving the most bytes (an upper bound), 'min' the least."""
    m = hlo.parse(serialized)
    memo: dict = {}

    def walk(cid: int, depth: int = 0) -> Cost:
        if cid in memo:
            return memo[cid]
        total = Cost()
        if depth > 64:
            return total
        for ins in m.computation(cid).instructions:
            op = ins.opcode
            if op == "while":
                trips, why = trip_count(m, ins)
                total.loops.append({"loop": ins.name, "source": m.source(ins), "trips": trips, "runs": 1.0,
                                    **({"unknown": why} if trips is None else {})})
                for c in ins.called_computation_ids:
                    is_cond = m.root(c).shape.element_type == 1 and not m.root(c).shape.dimensions
                    total.add(walk(c, depth + 1), (trips if trips is not None else 1) + (1 if is_cond else 0))
            elif op == "call":
                for c in ins.called_computation_ids:
                    total.add(walk(c, depth + 1))
            elif op == "conditional":
                branches = [walk(c, depth + 1) for c in ins.called_computation_ids]
                if branches:
                    pick = max if conditional == "max" else min
                    total.add(pick(branches, key=lambda b: b.bytes))
            else:
                total.add(instruction_cost(m, ins, n_devices))
        memo[cid] = total
        return total

    total = walk(m.entry)
    unknown = [lp for lp in total.loops if lp["trips"] is None]
    return {"bytes": total.bytes, "hbm_bytes": total.hbm_bytes, "cycles": total.cycles, "ici_bytes": total.ici_bytes,
            "uncosted_executions": total.uncosted, "by_source": total.by_source, "by_kind": total.by_kind,
            "loops": total.loops, "unknown_trip_loops": unknown}


def host_calls(serialized: bytes) -> list[str]:
    """What a compiled module runs on the host: custom-call targets of Python callbacks / host transfers,
    and send / recv / infeed / outfeed instructions."""
    m = hlo.parse(serialized)
    found = set()
    for ins in m.by_id.values():
        if ins.opcode == "custom-call" and any(h in ins.custom_call_target.lower() for h in HOST_TARGETS):
            found.add(ins.custom_call_target)
        if ins.opcode in ("send", "recv", "infeed", "outfeed") or ins.is_host_transfer:
            found.add(ins.opcode)
    return sorted(found)
