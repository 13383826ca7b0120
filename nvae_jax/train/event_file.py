"""TensorBoard event files of scalars, written with the standard library and numpy.

TensorBoard reads a run's directory of event files. An event file is a sequence of TFRecords,
integers little-endian:

    uint64 n | uint32 masked_crc(n as 8 bytes) | n bytes of data | uint32 masked_crc(data)

with masked_crc(b) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2^32), c = CRC-32C(b) (Castagnoli
polynomial, reflected 0x82f63b78). Each record is a serialized ``Event`` protocol buffer. The few
fields written here are encoded by hand (field number: type):

    Event:         1 wall_time: double, 2 step: int64, 3 file_version: string,
                   5 summary: Summary, 7 session_log: SessionLog
    Summary:       1 value: repeated Summary.Value
    Summary.Value: 1 tag: string, 2 simple_value: float
    SessionLog:    1 status: enum (START = 1)

A file opens with the version event (``file_version = "brain.Event:2"``). With ``purge_step`` it
then writes a START session log at that step, and TensorBoard drops the events of the directory's
earlier files at steps >= ``purge_step``: the steps a resumed run writes again.

Why not tensorboardX: importing it imports torch whenever torch is installed (1.0-1.4 s and about
0.2 GB of resident memory in the training process), for nothing but scalars.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

import numpy as np

FILE_VERSION = 'brain.Event:2'
_SESSION_START = 1


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``; crc32c(b'123456789') == 0xE3069283."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # a negative int64 is its 64-bit two's complement
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, payload: bytes = b'') -> bytes:
  """An ``Event`` with its wall time and step, then ``payload`` (its remaining fields)."""
  return (_varint(1 << 3 | 1) + struct.pack('<d', wall_time)
          + _varint(2 << 3 | 0) + _varint(int(step)) + payload)


def _float32(value: float) -> bytes:
  with np.errstate(over='ignore'):  # beyond float32's range: +-inf, as TensorBoard would show
    return np.asarray(value, '<f4').tobytes()


def scalars_event(step: int, scalars: Mapping[str, float], wall_time: float) -> bytes:
  """An ``Event`` whose summary holds one ``simple_value`` (float32) per tag."""
  values = b''.join(
      _length_delimited(1, _length_delimited(1, tag.encode('utf-8'))
                        + _varint(2 << 3 | 5) + _float32(value))
      for tag, value in scalars.items())
  return _event(step, wall_time, _length_delimited(5, values))


def version_event(wall_time: float) -> bytes:
  return _event(0, wall_time, _length_delimited(3, FILE_VERSION.encode('ascii')))


def session_start_event(step: int, wall_time: float) -> bytes:
  status = _varint(1 << 3 | 0) + _varint(_SESSION_START)
  return _event(step, wall_time, _length_delimited(7, status))


class ScalarEventWriter:
  """Appends scalar summaries to a new event file in ``logdir`` (created if missing).

  The file's name starts ``events.out.tfevents.`` and then the time in nanoseconds, so a later
  writer's file sorts after an earlier one's (TensorBoard reads a directory's files in name
  order, which is what makes ``purge_step`` apply to the earlier runs only).
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{time.time_ns():019d}.{socket.gethostname()}.{os.getpid()}'
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'xb')  # pylint: disable=consider-using-with
    now = time.time()
    self._file.write(tf_record(version_event(now)))
    if purge_step is not None:
      self._file.write(tf_record(session_start_event(purge_step, now)))
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event at ``step`` with every scalar of ``scalars`` (tag -> value); flushed."""
    if scalars:
      self._file.write(tf_record(scalars_event(step, scalars, time.time())))
      self._file.flush()

  def close(self) -> None:
    self._file.close()
