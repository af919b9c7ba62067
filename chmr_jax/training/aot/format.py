"""The compile rows as a table: every time, rate and MFU in it is an estimate (est.)."""
from __future__ import annotations

from chmr_jax.training.aot.topology import GiB

COLUMNS = ["topology", "chips", "global batch", "dtype", "remat", "peak GiB/chip", "HBM (XLA limit GiB)", "fits",
           "GFLOP/chip", "GB HBM / all", "MB ICI/chip", "est. step ms XLA", "HBM..all-memory roofline ms",
           "ICI ms", "est. molecules/s", "est. MFU", "compile s"]


def _ms(x):
    return f"{x * 1e3:.2f}" if x is not None else "-"


def format_rows(rows: list[dict]) -> str:
    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    for r in rows:
        hbm = f"{r['hbm_bytes'] / (GiB if r.get('hbm_unit') == 'GiB' else 1e9):.0f} {r.get('hbm_unit', 'GB')} " \
              f"({(r.get('hbm_limit_bytes') or 0) / GiB:.2f})"
        head = [r["topology"], r["chips"], f"{r['global_batch']:,}", r.get("dtype", ""), r.get("remat", "")]
        if r.get("step_s_xla") is None:     # refused by the compiler: does not fit
            need = r.get("per_chip_bytes")
            lines.append(" | ".join(str(v) for v in head + [f"> {need / GiB:.2f}" if need else "-", hbm, "NO"]
                                    + ["-"] * 8 + [r.get("compile_s", "-")]))
            continue
        vals = head + [f"{r['peak_bytes_per_chip'] / GiB:.2f}", hbm, "yes" if r["fits"] else "NO",
                       f"{r['flops_per_chip'] / 1e9:.1f}",
                       f"{r['hbm_bytes_accessed_per_chip'] / 1e9:.2f} / {r['bytes_accessed_per_chip'] / 1e9:.2f}",
                       f"{r['ici_bytes_per_chip'] / 1e6:.1f}", _ms(r["step_s_xla"]),
                       f"{_ms(r['step_s_hbm_roofline'])}..{_ms(r['step_s_all_memory_roofline'])}", _ms(r["step_s_ici"]),
                       f"{r['estimated_molecules_per_s']:,.0f}" if r.get("estimated_molecules_per_s") else "-",
                       f"{r['estimated_mfu']:.1%}" if r.get("estimated_mfu") is not None else "-", r["compile_s"]]
        lines.append(" | ".join(str(v) for v in vals))
    return "\n".join(lines)


def warnings(row: dict) -> list[str]:
    """Lines the figures need beside them: loops whose trip count could not be read (counted once)."""
    out = []
    unknown = row.get("unknown_trip_loops") or []
    if unknown:
        where = ", ".join(sorted({lp.get("source") or lp["loop"] for lp in unknown}))[:300]
        out.append(f"note: {len(unknown)} loop(s) of unreadable trip count counted once (cycles and bytes are lower "
                   f"bounds there): {where}")
    return out
