"""TensorBoard's event files read back, for tests of what a run shows in TensorBoard.

`scalars(directory)` gives each scalar's (step, value) points as TensorBoard displays them:
event files in the order they were written, and a run's purge mark (a `SessionLog.START`
event at step s, which `metrics.MetricWriter` writes on resume) drops the points of steps
>= s written before it. The files are TFRecords of `Event` protos: per record a
little-endian u64 length, its masked CRC-32C, the payload and the payload's masked
CRC-32C; the CRCs are checked. `assert_shows_metrics_jsonl(workdir)` compares them with
the run's `metrics.jsonl`. Tests import it as `import tensorboard_events`.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from nsync_jax import metrics

_SESSION_START = 1  # SessionLog.START: TensorBoard purges the steps from here on.


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str) -> list[event_pb2.Event]:
    """The events of one file, in order; a damaged record is an AssertionError."""
    with open(path, "rb") as f:
        data = f.read()
    events, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert header_crc == _masked_crc(header), f"{path}: bad length CRC at byte {offset}"
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert payload_crc == _masked_crc(payload), f"{path}: bad data CRC at byte {offset}"
        events.append(event_pb2.Event.FromString(payload))
        offset += 16 + length
    return events


def scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in `directory`, as TensorBoard shows
    them (see the module docstring)."""
    files = [read_events(os.path.join(directory, n)) for n in os.listdir(directory)]
    # Each file opens with its version event, stamped with the time the file was created.
    files.sort(key=lambda events: events[0].wall_time)
    points: dict[str, list[tuple[int, float]]] = {}
    for event in (e for events in files for e in events):
        if event.HasField("session_log") and event.session_log.status == _SESSION_START:
            points = {
                tag: [(s, v) for s, v in values if s < event.step] for tag, values in points.items()
            }
        for value in event.summary.value:
            if value.HasField("simple_value"):
                points.setdefault(value.tag, []).append((event.step, value.simple_value))
    return points


def assert_shows_metrics_jsonl(workdir: str) -> None:
    """TensorBoard shows each metric of `<workdir>/metrics.jsonl` at its steps with its value
    (the float32 an event holds), once per step, and nothing else."""
    shown = scalars(os.path.join(workdir, "tensorboard"))
    rows = metrics.read_metrics(workdir)
    logged = {name for row in rows for name in row if name != "step"}
    assert set(shown) == logged
    for name in sorted(logged):
        expected = [(row["step"], float(np.float32(row[name]))) for row in rows if name in row]
        assert shown[name] == expected, name
