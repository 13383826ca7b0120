"""TensorBoard event files (``nvae_jax.train.event_file``) against TensorBoard's own reader.

The CRC is checked on the published CRC-32C test vectors (RFC 3720, B.4), the records on
TensorBoard's record reader (which checks both CRCs of every record) and its protocol buffers, and
the purge of a resumed run on TensorBoard's ``EventAccumulator``.
"""

import math
import os

import numpy as np
import pytest

from nvae_jax.train import event_file


@pytest.mark.parametrize('data, crc', [
    (b'123456789', 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b'\xff' * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_matches_the_published_vectors(data, crc):
  assert event_file.crc32c(data) == crc


def _tensorboard(module: str):
  """A module of TensorBoard's event processing (the test is skipped without tensorboard)."""
  return pytest.importorskip(f'tensorboard.backend.event_processing.{module}')


def _records(path):
  """The records of an event file, through TensorBoard's reader (it checks the CRCs)."""
  return list(_tensorboard('event_file_loader').LegacyEventFileLoader(path).Load())


def test_tensorboard_reads_versions_scalars_and_session_start(tmp_path):
  writer = event_file.ScalarEventWriter(str(tmp_path), purge_step=7)
  scalars = {'train/loss': 1.25, 'train/κ': -3.0, 'train/big': 1e300, 'train/nan': math.nan,
             'eval/bits_per_dim': 2.9123}
  writer.write_scalars(7, scalars)
  writer.write_scalars(2**40 + 3, {'train/loss': 0.5})
  writer.write_scalars(8, {})  # nothing to write: no event
  writer.close()
  (name,) = os.listdir(tmp_path)
  assert name.startswith('events.out.tfevents.')

  first, start, summary, late = _records(writer.path)
  assert first.file_version == 'brain.Event:2' and first.wall_time > 1.6e9
  assert start.step == 7 and start.session_log.status == start.session_log.START
  assert summary.step == 7
  got = {v.tag: v.simple_value for v in summary.summary.value}
  # The field is a float32: 1e300 is inf there, 2.9123 its nearest float32.
  expected = {'train/loss': 1.25, 'train/κ': -3.0, 'train/big': math.inf, 'train/nan': math.nan,
              'eval/bits_per_dim': float(np.float32(2.9123))}
  assert list(got) == list(expected)
  for tag, value in expected.items():
    assert (math.isnan(got[tag]) and math.isnan(value)) or got[tag] == value, tag
  assert late.step == 2**40 + 3 and late.summary.value[0].simple_value == 0.5


def test_a_resumed_run_replaces_the_steps_it_writes_again(tmp_path):
  """Run 1 logs steps 1-5 and stops; run 2 resumes from the checkpoint of step 3 (purge step 4)
  and logs 4-6: TensorBoard shows 1-3 from run 1 and 4-6 from run 2, each step once."""
  event_accumulator = _tensorboard('event_accumulator')
  from nvae_jax.train import loop  # pylint: disable=import-outside-toplevel
  first = loop.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    first.write(step, 'train', {'loss': float(step), 'skipped': True})
  first.close()
  second = loop.MetricWriter(str(tmp_path))
  second.start_at(3)
  for step in range(4, 7):
    second.write(step, 'train', {'loss': 10.0 * step, 'note': 'text is not a scalar'})
  second.close()

  accumulator = event_accumulator.EventAccumulator(str(tmp_path / 'tb'))
  accumulator.Reload()
  assert accumulator.Tags()['scalars'] == ['train/loss']
  assert [(e.step, e.value) for e in accumulator.Scalars('train/loss')] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_the_event_files_of_two_writers_sort_in_creation_order(tmp_path):
  writers = [event_file.ScalarEventWriter(str(tmp_path)) for _ in range(3)]
  for writer in writers:
    writer.close()
  paths = [writer.path for writer in writers]
  assert sorted(paths) == paths and len(set(paths)) == 3
