"""TensorBoard event files written without TensorFlow."""

from __future__ import annotations

import struct

import pytest

from jaxrec.training import tensorboard as logging_lib


def test_crc32c_known_vectors():
    assert logging_lib.crc32c(b"123456789") == 0xE3069283
    assert logging_lib.crc32c(b"") == 0
    assert logging_lib.crc32c(bytes(32)) == 0x8A9136AA


def test_event_file_round_trip(tmp_path):
    w = logging_lib.EventWriter(tmp_path)
    w.scalars(1, {"train/loss": 2.5, "train/lr": 0.06})
    w.scalars(7, {"eval/recall1": 0.75})
    w.close()
    got = logging_lib.read_scalars(w.path)
    assert got == [
        (1, "train/loss", 2.5),
        (1, "train/lr", pytest.approx(0.06)),
        (7, "eval/recall1", 0.75),
    ]
    data = open(w.path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    assert b"brain.Event:2" in data[12 : 12 + n]  # first record is the file version


def test_corruption_is_detected(tmp_path):
    w = logging_lib.EventWriter(tmp_path)
    w.scalars(1, {"a": 1.0})
    w.close()
    data = bytearray(open(w.path, "rb").read())
    data[-6] ^= 0xFF
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        logging_lib.read_scalars(w.path)


def test_tensorboard_reads_our_files_if_installed(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    w = logging_lib.EventWriter(tmp_path)
    w.scalars(3, {"train/loss": 1.25})
    w.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    ev = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in ev] == [(3, 1.25)]


def test_format_helpers():
    assert logging_lib.format_duration(3725) == "1h02m05s"
    assert logging_lib.format_duration(65) == "1m05s"
    assert logging_lib.format_duration(5) == "5s"
