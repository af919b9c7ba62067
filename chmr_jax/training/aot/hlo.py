"""A compiled XLA program as structured data: the serialized HloModuleProto that
`compiled.runtime_executable().hlo_modules()[0].as_serialized_hlo_module_proto()` returns, decoded with a
schema of the fields read here (nothing is parsed from HLO text).

jax / jaxlib ship no Python classes for XLA's protos, so the messages below are declared at run time
with the field numbers of xla/service/hlo.proto and xla/xla_data.proto (openxla/xla); protobuf skips
the fields left out. Enums are read as plain integers (PrimitiveType numbers in DTYPE_BITS)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math

# (name, number, type, repeated, message type) per field; types: s=string, i=int64, i32=int32,
# u32 / u64 unsigned, b=bool, y=bytes, f=float, m=message.
_SCHEMA = {
    "TileProto": [("dimensions", 1, "i", True, None)],
    "LayoutProto": [("minor_to_major", 1, "i", True, None), ("tiles", 6, "m", True, "TileProto"),
                    ("element_size_in_bits", 7, "i", False, None), ("memory_space", 8, "i", False, None)],
    "ShapeProto": [("element_type", 2, "i32", False, None), ("dimensions", 3, "i", True, None),
                   ("tuple_shapes", 4, "m", True, "ShapeProto"), ("layout", 5, "m", False, "LayoutProto")],
    "OpMetadata": [("op_type", 1, "s", False, None), ("op_name", 2, "s", False, None),
                   ("source_file", 3, "s", False, None), ("source_line", 4, "i32", False, None),
                   ("stack_frame_id", 15, "i32", False, None)],
    "LiteralProto": [("shape", 1, "m", False, "ShapeProto"), ("preds", 2, "b", True, None),
                     ("s32s", 4, "i32", True, None), ("s64s", 5, "i", True, None), ("u32s", 6, "u32", True, None),
                     ("u64s", 7, "u64", True, None)],
    "ReplicaGroup": [("replica_ids", 1, "i", True, None)],
    "IotaReplicaGroupListProto": [("num_replica_groups", 1, "i", False, None),
                                  ("num_devices_per_group", 2, "i", False, None)],
    "CollectiveDeviceListProto": [("replica_groups", 1, "m", True, "ReplicaGroup"),
                                  ("iota_replica_group_list", 2, "m", False, "IotaReplicaGroupListProto")],
    "SourceTarget": [("source", 1, "i", False, None), ("target", 2, "i", False, None)],
    "OutputOperandAliasing": [("output_shape_index", 1, "i", True, None), ("operand_index", 2, "i", False, None)],
    "HloInstructionProto": [
        ("name", 1, "s", False, None), ("opcode", 2, "s", False, None), ("shape", 3, "m", False, "ShapeProto"),
        ("metadata", 7, "m", False, "OpMetadata"), ("literal", 8, "m", False, "LiteralProto"),
        ("parameter_number", 9, "i", False, None), ("tuple_index", 13, "i", False, None),
        ("custom_call_target", 28, "s", False, None), ("id", 35, "i", False, None),
        ("operand_ids", 36, "i", True, None), ("called_computation_ids", 38, "i", True, None),
        ("backend_config", 43, "y", False, None), ("is_host_transfer", 47, "b", False, None),
        ("replica_groups", 49, "m", True, "ReplicaGroup"), ("source_target_pairs", 52, "m", True, "SourceTarget"),
        ("comparison_direction", 63, "s", False, None),
        ("output_operand_aliasing", 74, "m", True, "OutputOperandAliasing"),
        ("collective_device_list", 87, "m", False, "CollectiveDeviceListProto")],
    "HloComputationProto": [("name", 1, "s", False, None), ("instructions", 2, "m", True, "HloInstructionProto"),
                            ("id", 5, "i", False, None), ("root_id", 6, "i", False, None)],
    "FileLocation": [("file_name_id", 1, "i32", False, None), ("function_name_id", 2, "i32", False, None),
                     ("line", 3, "i32", False, None)],
    "StackFrame": [("file_location_id", 1, "i32", False, None), ("parent_frame_id", 2, "i32", False, None)],
    "StackFrameIndexProto": [("file_names", 1, "s", True, None), ("function_names", 2, "s", True, None),
                             ("file_locations", 3, "m", True, "FileLocation"),
                             ("stack_frames", 4, "m", True, "StackFrame")],
    "HloModuleProto": [("name", 1, "s", False, None), ("entry_computation_name", 2, "s", False, None),
                       ("computations", 3, "m", True, "HloComputationProto"),
                       ("entry_computation_id", 6, "i", False, None),
                       ("stack_frame_index", 17, "m", False, "StackFrameIndexProto")],
}

# xla_data.proto PrimitiveType -> bits per element (tuples, tokens: 0).
DTYPE_BITS = {1: 8, 2: 8, 3: 16, 4: 32, 5: 64, 6: 8, 7: 16, 8: 32, 9: 64, 10: 16, 11: 32, 12: 64, 15: 64,
              16: 16, 18: 128, 19: 8, 20: 8, 21: 4, 22: 4, 23: 8, 24: 8, 25: 8, 26: 2, 27: 2, 28: 8, 29: 8,
              30: 1, 31: 1, 32: 4, 33: 8}
TUPLE = 13


@functools.lru_cache(maxsize=1)
def _module_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    types = {"s": F.TYPE_STRING, "i": F.TYPE_INT64, "i32": F.TYPE_INT32, "u32": F.TYPE_UINT32,
             "u64": F.TYPE_UINT64, "b": F.TYPE_BOOL, "y": F.TYPE_BYTES, "f": F.TYPE_FLOAT, "m": F.TYPE_MESSAGE}
    file = descriptor_pb2.FileDescriptorProto(name="chmr_jax_aot_hlo_subset.proto", package="chmr_aot",
                                              syntax="proto3")
    for message, fields in _SCHEMA.items():
        m = file.message_type.add(name=message)
        for name, number, kind, repeated, type_name in fields:
            f = m.field.add(name=name, number=number, type=types[kind],
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = f".chmr_aot.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("chmr_aot.HloModuleProto"))


def decode(serialized: bytes):
    """The HloModuleProto message of a serialized module (the fields of _SCHEMA)."""
    module = _module_class()()
    module.ParseFromString(serialized)
    return module


def module_proto(compiled) -> bytes:
    """The serialized, optimised HloModuleProto of a jax Compiled (the program the TPU runs)."""
    return compiled.runtime_executable().hlo_modules()[0].as_serialized_hlo_module_proto()


# ---- shapes --------------------------------------------------------------------------------------------

def arrays(shape) -> list:
    """The array ShapeProtos of a shape, tuples flattened."""
    if shape.element_type == TUPLE:
        return [a for s in shape.tuple_shapes for a in arrays(s)]
    return [shape] if shape.element_type in DTYPE_BITS else []


def padded_dims(shape) -> list[int]:
    """An array's dims padded to its layout's first tile: the tile's last size pads the most minor
    dimension, the one before it the next (TPU's (8, 128) tiles: an [N, 9] int32 array occupies N x 128
    words). Without a tiled layout, the dims themselves."""
    dims = list(shape.dimensions)
    if not shape.HasField("layout") or not shape.layout.tiles or not dims:
        return dims
    order = list(shape.layout.minor_to_major) or list(range(len(dims) - 1, -1, -1))
    for k, t in enumerate(reversed(list(shape.layout.tiles[0].dimensions))):
        if k < len(order) and t > 0:
            d = order[k]
            dims[d] = -(-dims[d] // t) * t
    return dims


def on_chip(shape) -> bool:
    """Placed in a memory other than HBM by TPU's memory-space assignment (memory_space >= 1: VMEM S(1),
    SMEM S(2), ...)."""
    return shape.HasField("layout") and shape.layout.memory_space > 0


def nbytes(shape, hbm_only: bool = False, padded: bool = True) -> float:
    """Bytes of the arrays of a shape (tuples: the sum), at their tile-padded sizes unless padded=False;
    hbm_only leaves out arrays placed in on-chip memory."""
    total = 0.0
    for a in arrays(shape):
        if hbm_only and on_chip(a):
            continue
        bits = (a.layout.element_size_in_bits if a.HasField("layout") and a.layout.element_size_in_bits
                else DTYPE_BITS[a.element_type])
        total += math.prod(padded_dims(a) if padded else a.dimensions) * bits / 8
    return total


# ---- the module as computations of instructions ------------------------------------------------------------

@dataclasses.dataclass
class Module:
    proto: object
    computations: dict          # id -> HloComputationProto
    by_id: dict                 # instruction id -> HloInstructionProto (ids are unique within a module)
    entry: int
    frames: dict                # stack frame id -> 'file.py:line (function)' of the innermost frame of ours

    def computation(self, cid):
        return self.computations[cid]

    def root(self, cid):
        comp = self.computations[cid]
        return self.by_id[comp.root_id] if comp.root_id in self.by_id else comp.instructions[-1]

    def operands(self, ins) -> list:
        return [self.by_id[i] for i in ins.operand_ids if i in self.by_id]

    def source(self, ins) -> str:
        """'file.py:line' of our code that made the instruction (its own source line, else the innermost
        stack frame in chmr_jax), else its op name's last part, else ''."""
        md = ins.metadata
        if md.source_file and "chmr_jax" in md.source_file and "/aot/" not in md.source_file:
            return f"{md.source_file.rsplit('/', 1)[-1]}:{md.source_line}"
        if md.stack_frame_id and md.stack_frame_id in self.frames:
            return self.frames[md.stack_frame_id]
        return md.op_name.split("/")[-1] if md.op_name else ""


def backend_config(ins) -> dict:
    """The instruction's backend_config as JSON (XLA:TPU writes JSON there), {} where it is not JSON."""
    if not ins.backend_config:
        return {}
    try:
        out = json.loads(ins.backend_config)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def _frames(index, ours: str = "chmr_jax") -> dict:
    """{stack frame id (1-based): 'file.py:line (function)' of the innermost frame in our package}."""
    files, funcs = list(index.file_names), list(index.function_names)
    locs, frames = list(index.file_locations), list(index.stack_frames)
    out = {}
    for k in range(1, len(frames) + 1):
        seen, frame = set(), k
        while 1 <= frame <= len(frames) and frame not in seen:
            seen.add(frame)
            f = frames[frame - 1]
            loc = locs[f.file_location_id - 1] if 1 <= f.file_location_id <= len(locs) else None
            file = files[loc.file_name_id - 1] if loc and 1 <= loc.file_name_id <= len(files) else ""
            if loc and ours in file and "/aot/" not in file:
                func = funcs[loc.function_name_id - 1] if 1 <= loc.function_name_id <= len(funcs) else ""
                out[k] = f"{file.rsplit('/', 1)[-1]}:{loc.line} ({func})"
                break
            frame = f.parent_frame_id
    return out


def parse(serialized: bytes) -> Module:
    proto = decode(serialized)
    comps = {c.id: c for c in proto.computations}
    by_id = {i.id: i for c in proto.computations for i in c.instructions}
    entry = proto.entry_computation_id
    if entry not in comps:
        entry = next((c.id for c in proto.computations if c.name == proto.entry_computation_name),
                     proto.computations[-1].id)
    return Module(proto, comps, by_id, entry, _frames(proto.stack_frame_index))
