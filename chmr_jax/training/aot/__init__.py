"""The pretraining step compiled for a TPU topology on a machine without a TPU (deviceless ahead-of-time
compilation): per-chip memory, the step time the compiler estimates beside two rooflines and the
chip-to-chip traffic, the largest global batch that fits. Nothing runs on a TPU: every time, rate and
MFU here is an ESTIMATE. One job per module:

  topology.py  chips' published figures (units as the vendor states them), slice names, libtpu's devices,
               the HBM limit the compiler applies
  sample.py    the molecules the shapes come from (which corpus, said first) and the abstract arguments
  hlo.py       the compiled program's HLO proto, decoded (no HLO text is parsed)
  cost.py      the step-time estimate's inputs: XLA:TPU's estimated cycles, bytes, ICI bytes, loop trips
  compile.py   compile_step: the row (step_s_xla, the rooflines, ICI, peak memory, MFU)
  fit.py       --fit: bounded probes in memory-capped subprocesses, logged as they finish, resumable
  format.py    the table

  spec = aot.parse_topology("v5e-16")     # also v5litepod-16, v4-32, v5p-128, v6e-64, v5e:4x4, ...
  row = aot.compile_step(config, spec)     # one dict: ROW_FIELDS and more
"""
from chmr_jax.training.aot.compile import ROW_FIELDS, compile_step
from chmr_jax.training.aot.cost import host_calls, program_cost
from chmr_jax.training.aot.fit import bracket_text, largest_batch
from chmr_jax.training.aot.format import format_rows, warnings
from chmr_jax.training.aot.sample import PAPER_MOLECULES, Sample, find_corpus, load_sample, prepared_corpus_dir
from chmr_jax.training.aot.topology import (CHIPS, GB, GiB, Chip, CompileError, Topology, hbm_limit, hbm_refusal,
                                            parse_topology, quiet_libtpu, tpu_devices)
