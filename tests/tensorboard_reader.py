"""Read scalars back from TensorBoard event files (tfrecord framing + tensorboardX's protobufs)."""
import struct
from pathlib import Path


def read_scalars(logdir) -> dict:
    from tensorboardX.proto import event_pb2

    out: dict = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos: pos + 8])
            record = data[pos + 12: pos + 12 + length]  # skip the length's crc
            pos += 12 + length + 4                       # and the record's crc
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
