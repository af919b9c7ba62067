"""`chmr-jax` of whichever checkout is on PYTHONPATH, recording from inside its compile what commits
before issue 34 do not write: the compiler's own serialized HloModuleProto ($WRAP_OUT.direct.pb) and its
memory analysis with the peak ($WRAP_OUT.mem.json) of every jax Compiled whose memory_analysis() the
command asks for (a second one gets $WRAP_OUT.1...). Used by benchmarks/tpu_tuning_xla.py:

    cd <worktree of an old commit> && WRAP_OUT=/abs/runs/tpu/<commit> PYTHONPATH=$PWD \
        python /abs/benchmarks/tpu_compile_recorded.py compile --config configs/paper.py:tpu_pod ...
"""
import json, os, sys
import chmr_jax
print("code from", chmr_jax.__file__, flush=True)
import jax.stages
_orig = jax.stages.Compiled.memory_analysis
_count = [0]
def memory_analysis(self):
    mem = _orig(self)
    base = os.environ["WRAP_OUT"] + (f".{_count[0]}" if _count[0] else "")
    _count[0] += 1
    try:
        proto = self.runtime_executable().hlo_modules()[0].as_serialized_hlo_module_proto()
        open(base + ".direct.pb", "wb").write(proto)
    except Exception as e:
        print("wrap: no proto:", e, flush=True)
    rec = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                            "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
           if hasattr(mem, k)}
    open(base + ".mem.json", "w").write(json.dumps(rec))
    print("wrap: recorded", base, rec, flush=True)
    return mem
jax.stages.Compiled.memory_analysis = memory_analysis
from chmr_jax import cli
sys.argv = ["chmr-jax"] + sys.argv[1:]
sys.exit(cli.main())
