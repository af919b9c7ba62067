"""Metric writers: TensorBoard events decoded by the real protobuf library, JSONL truncation on
resume."""
import json

import numpy as np

from chmr_jax.training import metric_writers as mw
from helpers import event_class, read_event_records


def test_tensorboard_events_decode_with_protobuf(tmp_path):
    Event = event_class()
    w = mw.TensorBoardWriter(tmp_path, resume_step=7)
    w.write(8, {"loss": 1.5, "vq/perplexity": np.array([2.0, 3.5])})
    w.write(9, {"loss": np.float32(0.25)})
    w.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = [Event.FromString(p) for p in read_event_records(files[0])]
    assert events[0].file_version == "brain.Event:2"
    # The resume marker (Event.session_log is field 7 of event.proto): TensorBoard drops the older
    # events from the first resumed step on.
    assert [(e.step, e.session_log.status) for e in events if e.HasField("session_log")] == [(8, 1)]
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert scalars == [(8, "loss", 1.5), (8, "vq/perplexity/0", 2.0), (8, "vq/perplexity/1", 3.5), (9, "loss", 0.25)]


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
