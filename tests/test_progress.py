"""nvae_jax.progress: log lines (rate, ETA, interval) and the tqdm bar, captured."""

import io

import pytest

from nvae_jax import progress


class FakeClock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_log_lines_per_interval_with_rate_and_eta():
  clock, out = FakeClock(), io.StringIO()
  bar = progress.Progress(10, 'eval test', 'batch', mode='log', interval=30, stream=out,
                          clock=clock)
  clock.t += 50.0          # the first batch compiles: 50 s
  bar.update(1)            # first line (50 s since start >= 30 s)
  for _ in range(4):       # then 10 s per batch
    clock.t += 10.0
    bar.update(1, nats=81.25)
  bar.close()
  bar.close()              # idempotent
  lines = out.getvalue().splitlines()
  # 50 s: line; 60, 70: < 30 s since it; 80: line; 90: not; close: line.
  assert len(lines) == 3, lines
  # Only the first update: rate = 1 / 50 s; ETA = 9 / 0.02 = 450 s.
  assert lines[0] == 'eval test: 1/10 (10%) | 0.02 batch/s | ETA 7m30s | elapsed 50s'
  # At 80 s: 3 batches in 30 s after the first -> 0.1/s, 6 left -> 60 s.
  assert lines[1] == ('eval test: 4/10 (40%) | 0.1 batch/s | ETA 1m00s | elapsed 1m20s | '
                      'nats 81.25')
  assert lines[2] == ('eval test: 5/10 (50%) | 0.1 batch/s | ETA 50s | elapsed 1m30s | '
                      'nats 81.25')


def test_track_unknown_total_and_off_mode():
  clock, out = FakeClock(), io.StringIO()

  def items():
    for i in range(3):
      clock.t += 2.0
      yield i

  assert list(progress.track(items(), desc='runs', mode='log', interval=0, stream=out,
                             clock=clock)) == [0, 1, 2]
  lines = out.getvalue().splitlines()
  assert lines[-1] == 'runs: 3 | 0.5 it/s | elapsed 6s'   # no total: no ETA
  assert len(lines) == 3                # interval 0: every update; close repeats no line
  short = io.StringIO()     # a loop shorter than one interval prints nothing
  list(progress.track(items(), desc='short', mode='log', interval=60, stream=short, clock=clock))
  assert short.getvalue() == ''
  silent = io.StringIO()
  assert list(progress.track(range(3), mode='off', stream=silent)) == [0, 1, 2]
  assert silent.getvalue() == ''


def test_bar_mode_is_tqdm():
  out = io.StringIO()
  with progress.Progress(4, 'bn re-estimation', 'pass', mode='bar', stream=out) as bar:
    for _ in range(4):
      bar.update(1, skipped=0)
  text = out.getvalue()
  assert 'bn re-estimation' in text and '4/4' in text and 'pass/s' in text
  assert 'skipped=0' in text


def test_mode_from_environment_and_errors(monkeypatch):
  monkeypatch.setenv(progress.ENV_MODE, 'off')
  assert progress.resolve_mode() == 'off'
  assert progress.resolve_mode('log') == 'log'     # an explicit mode wins
  monkeypatch.setenv(progress.ENV_MODE, 'auto')
  assert progress.resolve_mode() == 'log'          # not inside a Jupyter kernel
  monkeypatch.setenv(progress.ENV_MODE, 'fancy')
  with pytest.raises(ValueError, match="NVAE_JAX_PROGRESS: expected one of .* found 'fancy'"):
    progress.resolve_mode()
  monkeypatch.delenv(progress.ENV_MODE)
  monkeypatch.setenv(progress.ENV_INTERVAL, '-1')
  with pytest.raises(ValueError, match='NVAE_JAX_PROGRESS_INTERVAL'):
    progress.Progress(3, mode='log')
  with pytest.raises(ValueError, match='total'):
    progress.Progress(-1, mode='off')


def test_format_duration():
  assert progress.format_duration(7.4) == '7s'
  assert progress.format_duration(125) == '2m05s'
  assert progress.format_duration(3723) == '1h02m03s'
  assert progress.format_duration(float('nan')) == '?'
