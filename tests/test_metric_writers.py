"""Metric writers: TensorBoard events decoded by the real protobuf library, CRC32C test vectors,
JSONL truncation on resume."""
import json
import struct

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from chmr_jax.training import metric_writers as mw


def _event_class():
    """tensorflow.Event / Summary / SessionLog (the fields we write) as dynamic protobuf classes,
    declared with event.proto / summary.proto's field numbers: an independent decoder."""
    f = descriptor_pb2.FileDescriptorProto(name="chmr_test_event.proto", package="tftest", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name
        return m

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("Value", [("tag", 1, T.TYPE_STRING, opt, None), ("simple_value", 2, T.TYPE_FLOAT, opt, None)])
    msg("Summary", [("value", 1, T.TYPE_MESSAGE, rep, ".tftest.Value")])
    msg("SessionLog", [("status", 1, T.TYPE_INT32, opt, None)])
    msg("Event", [("wall_time", 1, T.TYPE_DOUBLE, opt, None), ("step", 2, T.TYPE_INT64, opt, None),
                  ("file_version", 3, T.TYPE_STRING, opt, None), ("summary", 5, T.TYPE_MESSAGE, opt, ".tftest.Summary"),
                  ("session_log", 6, T.TYPE_MESSAGE, opt, ".tftest.SessionLog")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.Event"))


def test_crc32c_known_vectors():
    # RFC 3720 / iSCSI check values.
    assert mw.crc32c(b"123456789") == 0xE3069283
    assert mw.crc32c(bytes(32)) == 0x8A9136AA
    assert mw.crc32c(b"\xff" * 32) == 0x62A8AB43


def test_tensorboard_events_decode_with_protobuf(tmp_path):
    Event = _event_class()
    w = mw.TensorBoardWriter(tmp_path, resume_step=7)
    w.write(8, {"loss": 1.5, "vq/perplexity": np.array([2.0, 3.5])})
    w.write(9, {"loss": np.float32(0.25)})
    w.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = [Event.FromString(p) for p in mw.read_tfrecords(files[0])]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == 1 and events[1].step == 7
    assert events[2].step == 8
    assert {v.tag: v.simple_value for v in events[2].summary.value} == {
        "loss": 1.5, "vq/perplexity/0": 2.0, "vq/perplexity/1": 3.5}
    assert events[3].step == 9 and events[3].summary.value[0].simple_value == 0.25


def test_corrupt_record_is_detected(tmp_path):
    path = tmp_path / "events.out.tfevents.x"
    data = bytearray(mw.tfrecord(mw.scalar_event(1, 0.0, {"a": 1.0})))
    data[20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        mw.read_tfrecords(path)
    # Framing: 8-byte length then its masked CRC.
    assert struct.unpack("<Q", bytes(data[:8]))[0] == len(data) - 16


def test_jsonl_resume_drops_rows_after_the_checkpoint(tmp_path):
    w = mw.JsonlWriter(tmp_path / "m.jsonl")
    for s in range(1, 6):
        w.write(s, {"loss": float(s), "bad": float("nan")})
    w.close()
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')           # a line cut short by SIGKILL
    w = mw.JsonlWriter(tmp_path / "m.jsonl", resume_step=3)
    w.write(4, {"loss": 40.0})
    w.close()
    rows = mw.read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 40.0 and rows[0]["bad"] == "nan"
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["loss"] == 1.0
    # A fresh (non-resumed) run starts a new file.
    mw.JsonlWriter(tmp_path / "m.jsonl").close()
    assert mw.read_jsonl(tmp_path / "m.jsonl") == []
