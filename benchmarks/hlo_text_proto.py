"""The serialized HloModuleProto of a compiled program's HLO text, for `benchmarks/tpu_compile.py --analyse`.

A checkout before issue 34 writes only the text of the compiled TPU program (`chmr-jax compile --hlo_dump
X` wrote X; later checkouts also write X.pb). The cost walk (`chmr_jax/training/aot/cost.py`) reads the
proto, so an old dump is turned into one by XLA's own HLO parser (`hlo_module_from_text`, the parser the
aot tests' hand-written modules go through). What the walk reads survives the round trip: shapes with
their tiled layouts and memory spaces, backend_config (XLA:TPU's `estimated_cycles`, `known_trip_count`),
metadata and the stack-frame index (printed in the text since the jax versions this project uses).

    python benchmarks/hlo_text_proto.py runs/tpu/713beb9.hlo [more.hlo ...]   # writes runs/tpu/713beb9.hlo.pb

For each file it prints how many instructions carry an `estimated_cycles` in the text and in the proto
(they must agree; the command fails where they do not) and refuses to overwrite an existing .pb unless
--force (a .pb written by `chmr-jax compile` itself is the compiler's own serialization)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# One HLO instruction line in the text: '  [ROOT ]%name = shape opcode(...), ..., backend_config=...'.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=")


def text_to_proto(text: str) -> bytes:
    """The serialized HloModuleProto of an HLO module's text (XLA's parser; raises on text it refuses)."""
    from jax._src.lib import xla_client
    return xla_client.hlo.hlo_module_from_text(text).as_serialized_hlo_module_proto()


def cycles_in_text(text: str) -> int:
    """Instructions of the text whose line carries an estimated_cycles."""
    return sum(1 for line in text.splitlines() if _INSTRUCTION.match(line) and "estimated_cycles" in line)


def cycles_in_proto(serialized: bytes) -> int:
    """Instructions of the proto whose backend_config carries an estimated_cycles."""
    from chmr_jax.training.aot import hlo
    module = hlo.decode(serialized)
    return sum(1 for c in module.computations for i in c.instructions if b"estimated_cycles" in i.backend_config)


def convert(path: Path, force: bool = False) -> tuple[Path, int, int]:
    out = Path(f"{path}.pb")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (--force replaces it)")
    text = path.read_text()
    proto = text_to_proto(text)
    in_text, in_proto = cycles_in_text(text), cycles_in_proto(proto)
    if in_text != in_proto:
        raise ValueError(f"{path}: {in_text} instructions carry estimated_cycles in the text, {in_proto} in the proto")
    out.write_bytes(proto)
    return out, in_text, in_proto


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="HLO text files (chmr-jax compile --hlo_dump)")
    parser.add_argument("--force", action="store_true", help="replace an existing .pb")
    args = parser.parse_args(argv)
    for p in args.paths:
        try:
            out, in_text, _ = convert(Path(p), args.force)
        except (OSError, ValueError, RuntimeError) as e:   # RuntimeError: XLA refused the text
            print(f"hlo_text_proto: {e}", file=sys.stderr)
            return 2
        print(f"{out}: {in_text} instructions with estimated_cycles (text and proto agree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
