"""Metric writers: JSON lines and TensorBoard event files, with no TensorFlow import.

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (length, masked CRC32C of the
length, payload, masked CRC32C of the payload) around serialized `tensorflow.Event` protos. The
two messages we need (Event with a Summary of scalar values, SessionLog) are a handful of fields,
so they are encoded by hand below instead of pulling in tensorflow or tensorboard (clu's writers
import TensorFlow). Field numbers follow tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np

from chmr_jax.data import featurize

# ---- CRC32C (Castagnoli), as TFRecord framing requires ------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def read_tfrecords(path) -> list[bytes]:
    """Payloads of a TFRecord file, checking both CRCs (used by tests and `chmr-jax report`)."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        payload = data[pos + 12:pos + 12 + length]
        (pcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if hcrc != masked_crc32c(header) or pcrc != masked_crc32c(payload):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        out.append(payload)
        pos += 16 + length
    return out


# ---- protobuf wire format for the few fields we write ---------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, wall_time: float, scalars: dict) -> bytes:
    """Event{wall_time=1, step=2, summary=5: Summary{value=1: Value{tag=1, simple_value=2}}}."""
    values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in scalars.items())
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _field_bytes(5, values)


def file_version_event(wall_time: float) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + _field_bytes(3, b"brain.Event:2")


def session_start_event(step: int, wall_time: float) -> bytes:
    """SessionLog START at `step`: TensorBoard discards events with larger steps from before it,
    so a resumed run's curve replaces the killed run's tail instead of overlapping it."""
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _field_bytes(6, b"\x08\x01")


def scalars_of(metrics: dict) -> dict:
    """Flattens metrics to {tag: float}: scalars as is, small vectors as tag/0, tag/1, ..."""
    out = {}
    for tag, value in metrics.items():
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            out[tag] = float(arr)
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{tag}/{i}"] = float(v)
    return out


# ---- writers -------------------------------------------------------------------------------------

class TensorBoardWriter:
    def __init__(self, logdir, resume_step: int | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._fh = open(self.logdir / name, "ab")
        now = time.time()
        self._fh.write(tfrecord(file_version_event(now)))
        if resume_step is not None:
            self._fh.write(tfrecord(session_start_event(resume_step, now)))
        self._fh.flush()

    def write(self, step: int, metrics: dict) -> None:
        self._fh.write(tfrecord(scalar_event(step, time.time(), scalars_of(metrics))))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class JsonlWriter:
    """One JSON object per line: {"step": s, "time": unix seconds, metric: value, ...}.

    resume_step: rows with step > resume_step (written after the checkpoint a resumed run
    restarts from) are dropped first, so the file is the curve of the run that survived.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _complete_row(line) and json.loads(line)["step"] <= resume_step]
            featurize.atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in scalars_of(metrics).items():
            row[k] = v if math.isfinite(v) else str(v)   # JSON has no NaN / inf
        self._fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _complete_row(line: str) -> bool:
    # A SIGKILL can cut the last line short; such a line is dropped, not fatal.
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip() and _complete_row(line)]


class MetricWriters:
    """Writes the same metrics to JSONL (`metrics.jsonl`) and TensorBoard (`tensorboard/`)."""

    def __init__(self, workdir, resume_step: int | None = None, tensorboard: bool = True):
        workdir = Path(workdir)
        self.writers = [JsonlWriter(workdir / "metrics.jsonl", resume_step)]
        if tensorboard:
            self.writers.append(TensorBoardWriter(workdir / "tensorboard", resume_step))

    def write(self, step: int, metrics: dict) -> None:
        for w in self.writers:
            w.write(step, metrics)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
