"""The TPU chips and slices `chmr-jax compile` knows: published per-chip figures (CHIPS), Cloud TPU slice
names -> libtpu topologies (parse_topology), the topology's devices described by libtpu without a TPU
(tpu_devices), and the HBM limit the TPU compiler itself applies (hbm_limit)."""
from __future__ import annotations

import dataclasses
import math
import os
import re

GB, GiB = 10 ** 9, 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published figures, capacities in the unit its vendor page states them (hbm_unit).

    clock_hz is derived, not published for every generation: peak bf16 FLOP/s over the matrix units'
    FLOPs per cycle (MXUs per chip x dim^2 multiply-adds x 2). It converts XLA:TPU's per-instruction
    `estimated_cycles` into seconds. v4: 275e12 / (8 x 128^2 x 2) = 1.05 GHz, the v4 paper's clock;
    v5e: 197e12 / (4 x 128^2 x 2) = 1.50 GHz; v5p: 459e12 / (8 x 128^2 x 2) = 1.75 GHz; v6e: 918e12 /
    (2 x 256^2 x 2) = 3.50 GHz (from the page's 2 MXUs of 256 x 256; unconfirmed by a second source)."""
    generation: str
    peak_flops: float        # bf16 FLOP/s per chip
    hbm_bytes: int           # HBM capacity as the vendor states it (hbm_unit)
    hbm_unit: str            # 'GB' (10^9) or 'GiB' (2^30): the vendor's own unit
    hbm_bytes_per_s: float
    ici_bytes_per_s: float   # inter-chip interconnect, bidirectional, per chip
    cores_per_chip: int
    mxus_per_chip: int
    mxu_dim: int
    cloud_name: str          # Cloud TPU accelerator-type prefix (v5litepod-16)
    source: str

    @property
    def clock_hz(self) -> float:
        return self.peak_flops / (self.mxus_per_chip * self.mxu_dim ** 2 * 2)

    def hbm_text(self) -> str:
        return f"{self.hbm_bytes / (GiB if self.hbm_unit == 'GiB' else GB):.0f} {self.hbm_unit}"


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, "GiB", 1200e9, 1.1e15 / 4096, 2, 8, 128, "v4",
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GBps, 2 TensorCores x 4 MXUs; "
               "ICI: the page's all-reduce bandwidth per pod (1.1 PB/s) / 4096 chips"),
    "v5e": Chip("v5e", 197e12, 16 * GB, "GB", 819e9, 400e9, 1, 4, 128, "v5litepod",
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2, 819 GBps, 400 GBps ICI "
                "(bidirectional), 1 TensorCore x 4 MXUs"),
    "v5p": Chip("v5p", 459e12, 95 * GB, "GB", 2765e9, 4800e9 / 8, 2, 8, 128, "v5p",
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e, 2765 GBps, 4800 Gbps ICI, "
                "2 TensorCores x 4 MXUs"),
    "v6e": Chip("v6e", 918e12, 32 * GB, "GB", 1640e9, 800e9, 1, 2, 256, "v6e",
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM, 1640 GBps, 800 GBps ICI "
                "(bidirectional), 1 TensorCore x 2 MXUs of 256 x 256"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "trillium": "v6e"}
# Slice shapes Cloud TPU offers, by chip count: 2-D tori for v5e / v6e, 3-D for v4 / v5p.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


class CompileError(ValueError):
    """The step does not compile for that topology, or uses an op the TPU cannot run (one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                  # as given
    chip: Chip
    topology_name: str         # libtpu's, e.g. 'v5e:4x4'
    chips: int
    chips_per_host_bounds: tuple
    num_slices: int = 1

    @property
    def hosts(self) -> int:
        return self.num_slices * self.chips // math.prod(self.chips_per_host_bounds)

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's accelerator type of the slice (v5litepod-16, v4-32: v4 / v5p count TensorCores)."""
        return f"{self.chip.cloud_name}-{self.chips * self.chip.cores_per_chip}"


def parse_topology(name: str) -> Topology:
    """'v5e-16', 'v5litepod-16', 'v4-32' (cores: 16 chips), 'v5p-128' (64 chips), 'v6e-64', or libtpu's
    own 'v5e:4x4' / 'v4:2x2x4'. Hosts hold 4 chips (2x2x1), as Cloud TPU's pod hosts do; a v5e / v6e
    slice of at most 8 chips is one host."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod|v6litepod|trillium)(?::(\d+(?:x\d+){1,2})|-(\d+))", text)
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}: use a Cloud TPU name like v5e-16, v5litepod-16, v4-32, "
                         f"v5p-128, v6e-64 (the number counts cores for v4 / v5p, chips for v5e / v6e) or "
                         f"libtpu's form like v5e:4x4, v4:2x2x4; generations {sorted(CHIPS)}")
    chip = CHIPS[gen]
    three_d = gen in ("v4", "v5p")
    if m.group(2):
        dims = tuple(int(x) for x in m.group(2).split("x"))
        if len(dims) != (3 if three_d else 2):
            raise ValueError(f"{name!r}: {gen} topologies are {'3' if three_d else '2'}-D (e.g. "
                             f"{'v4:2x2x4' if three_d else 'v5e:4x4'})")
        chips = math.prod(dims)
    else:
        count = int(m.group(3))
        if count % chip.cores_per_chip:
            raise ValueError(f"{name!r}: {gen}-N counts TensorCores, {chip.cores_per_chip} per chip; N must be even")
        chips = count // chip.cores_per_chip
        shapes = SHAPES_3D if three_d else SHAPES_2D
        if chips not in shapes:
            raise ValueError(f"{name!r}: no {gen} slice of {chips} chips; Cloud TPU offers "
                             f"{', '.join(f'{gen}-{c * chip.cores_per_chip}' for c in shapes)}")
        dims = shapes[chips]
    topology_name = f"{gen}:{'x'.join(map(str, dims))}"
    if three_d:
        per_host = (min(2, dims[0]), min(2, dims[1]), 1)
    elif chips <= 8:
        per_host = (dims[0], dims[1], 1)
    else:
        per_host = (2, 2, 1)
    return Topology(name, chip, topology_name, chips, per_host)


def quiet_libtpu(spec: Topology) -> None:
    """Environment for libtpu on a machine without a TPU, set before it loads: no GCE metadata server to ask
    (TPU_SKIP_MDS_QUERY), and the accelerator type and worker hostnames it would otherwise look up and
    complain about on stderr ('Failed to find host bounds ...', 'unexpected worker hostname ...': harmless
    here, nothing is attached). A user's own settings win. libtpu takes a machine-wide lockfile per process;
    no TPU is claimed here, so compiles may run side by side (ALLOW_MULTIPLE_LIBTPU_LOAD)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(spec: Topology) -> list:
    """The topology's devices as libtpu describes them, with no TPU attached. JAX must run on CPU here
    (jax_platforms=cpu before any backend is initialised): libtpu would otherwise try to claim a TPU."""
    quiet_libtpu(spec)
    from jax.experimental import topologies
    try:
        # v4's default chip config describes each TensorCore as a device; Cloud TPU v4 VMs run the two
        # cores of a chip as one device (megacore), as v5p's default does.
        topo = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                            chip_config_name="megacore" if spec.chip.generation == "v4" else "default",
                                            chips_per_host_bounds=spec.chips_per_host_bounds,
                                            num_slices=spec.num_slices)
    except Exception as e:   # no libtpu, or a topology libtpu does not know
        low = str(e).lower()
        hint = ("install libtpu (pip install 'jax[tpu]' brings the one matching your jax)"
                if "tpu" in low and ("plugin" in low or "not found" in low or "unknown backend" in low) else "")
        raise CompileError(f"cannot describe TPU topology {spec.topology_name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}){'; ' + hint if hint else ''}") from None
    devices = list(topo.devices)
    if len(devices) != spec.chips:
        raise CompileError(f"libtpu describes {len(devices)} devices for {spec.topology_name}, expected {spec.chips}")
    return devices


def hbm_refusal(text: str):
    """(bytes needed or None, bytes the compiler allows or None, what the first figure is) when a TPU
    compile error is an HBM refusal, else None (on-chip vmem / smem exhaustion is a compile error).
    XLA prints sizes in GiB-based units ('G' = 2^30). Two messages are known: '... HLO temporaries
    (54.12G) exceeds available HBM (15.75G)' and 'Ran out of memory in memory space hbm. Used 21.95G
    of 15.48G hbm'."""
    unit = lambda u: {"G": GiB, "M": 2 ** 20, "K": 2 ** 10, "": 1}[u]
    m = re.search(r"HLO temporaries \(([\d.]+)([GMK]?)\) exceeds available HBM \(([\d.]+)([GMK]?)\)", text)
    if m:
        return int(float(m.group(1)) * unit(m.group(2))), int(float(m.group(3)) * unit(m.group(4))), "temporaries"
    m = re.search(r"memory space hbm\. Used ([\d.]+)([GMK]?) of ([\d.]+)([GMK]?) hbm", text)
    if m:
        return int(float(m.group(1)) * unit(m.group(2))), int(float(m.group(3)) * unit(m.group(4))), "total"
    if "RESOURCE_EXHAUSTED" in text and re.search(r"\bhbm\b|\bHBM\b", text) and not re.search(r"vmem|smem", text, re.I):
        return None, None, "unknown"
    return None


_LIMITS: dict = {}


def hbm_limit(devices) -> int:
    """The HBM per chip the TPU compiler lets a program use (v5e: 15.75 GiB of its 16 GB), read from the
    compiler itself: a one-chip program whose 128 GiB of temporaries it must refuse, and the limit its
    refusal names (to 0.01 GiB: XLA prints two decimals). About half a second, once per device kind."""
    kind = devices[0].device_kind
    if kind not in _LIMITS:
        import jax
        import jax.numpy as jnp
        import numpy as np
        mesh = jax.sharding.Mesh(np.array(devices[:1]), ("d",))
        x = jax.ShapeDtypeStruct((1024,), jnp.float32,
                                 sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        try:
            jax.jit(lambda v: jnp.broadcast_to(v, (2 ** 25, 1024)) + 1).lower(x).compile()
            raise CompileError(f"the TPU compiler accepted 128 GiB on one {kind} chip: cannot read its HBM limit")
        except CompileError:
            raise
        except Exception as e:
            refused = hbm_refusal(str(e))
            if not refused or not refused[1]:
                raise CompileError(f"cannot read the HBM limit of {kind} from the compiler: "
                                   f"{str(e).splitlines()[0][:200]}") from None
            _LIMITS[kind] = refused[1]
    return _LIMITS[kind]
