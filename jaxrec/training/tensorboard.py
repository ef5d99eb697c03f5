"""Training logs: TensorBoard event files written without TensorFlow, and a stdout logger.

The event file format is TFRecord framing around `Event` protocol buffers. Each record is
`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`, all little
endian. We encode the handful of protobuf fields we need (wall_time, step, file_version and
scalar summaries) by hand, so neither TensorFlow nor tensorboardX is required; TensorBoard reads
the files as usual (`tensorboard --logdir WORKDIR/tensorboard`).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC used by TFRecord framing."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def encode_scalar_event(step: int, wall_time: float, scalars: Mapping[str, float]) -> bytes:
    """Serialize an `Event` carrying one simple_value per tag."""
    values = b""
    for tag, value in scalars.items():
        v = _len_field(1, tag.encode("utf-8")) + b"\x15" + struct.pack("<f", float(value))
        values += _len_field(1, v)
    return (
        b"\x09"
        + struct.pack("<d", wall_time)
        + b"\x10"
        + _varint(int(step))
        + _len_field(5, values)
    )


def _encode_version_event(wall_time: float) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + _len_field(3, b"brain.Event:2")


def frame_record(data: bytes) -> bytes:
    """TFRecord framing of one serialized record."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(os.fspath(logdir), name)
        self._f = open(self.path, "ab")  # noqa: SIM115 - open until close()
        self._f.write(frame_record(_encode_version_event(now)))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._f.write(frame_record(encode_scalar_event(step, time.time(), values)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
        elif wire == 1:
            val = buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            val = buf[pos : pos + 4]
            pos += 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            val = buf[pos : pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, val


def read_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """Read back `(step, tag, value)` from an event file, checking every CRC (for tests/tools)."""
    out: list[tuple[int, str, float]] = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: corrupt record header at byte {pos}")
        rec = data[pos + 12 : pos + 12 + n]
        (dcrc,) = struct.unpack("<I", data[pos + 12 + n : pos + 16 + n])
        if dcrc != masked_crc32c(rec):
            raise ValueError(f"{path}: corrupt record data at byte {pos}")
        pos += 16 + n
        step = 0
        summary = None
        for field, _, val in _fields(rec):
            if field == 2:
                step = int(val)
            elif field == 5:
                summary = val
        if summary is None:
            continue
        for field, _, value_msg in _fields(summary):
            if field != 1:
                continue
            tag, simple = "", None
            for f2, _, v2 in _fields(value_msg):
                if f2 == 1:
                    tag = v2.decode("utf-8")
                elif f2 == 2:
                    (simple,) = struct.unpack("<f", v2)
            if simple is not None:
                out.append((step, tag, simple))
    return out


def format_duration(seconds: float) -> str:
    """`1h02m03s` style durations for ETA output."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_metrics(values: Mapping[str, float]) -> str:
    """`name value` pairs with sensible precision for a log line."""
    parts = []
    for k, v in values.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.6g}" if abs(v) < 1e-3 and v != 0 else f"{k} {v:.5f}")
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


def log(msg: str) -> None:
    """Print one line to stdout, flushed (works with tqdm bars on stderr)."""
    print(msg, file=sys.stdout, flush=True)
