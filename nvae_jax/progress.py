"""Progress of long loops: a bar in notebooks, one log line per interval elsewhere.

Used by evaluation over a split, BN re-estimation, checkpoint conversion and the benchmark
scripts (the training loop prints its own lines and adds a bar in notebooks). It imports nothing
from the rest of the package, so every floor may use it::

  with Progress(total=len(batches), desc='eval test', unit='batch') as bar:
    for batch in batches:
      ...
      bar.update(1, nats=running_mean)       # optional key/value pairs shown with the count
  for x in track(items, desc='convert'):    # the same around an iterable
    ...

Rate and ETA. With n items done at time t, the first update at (n_1, t_1) (often a
compilation, so kept out of the rate once a second update arrives)::

  rate = (n - n_1) / (t - t_1)        (n_1 / (t_1 - t_0) while only the first update is in)
  ETA  = (total - n) / rate

Modes (``mode=`` or the ``NVAE_JAX_PROGRESS`` environment variable; explicit ``mode`` wins):

* ``bar``: tqdm's notebook-aware bar (``tqdm.auto``): a widget in Jupyter/Colab when ipywidgets
  is installed, a text bar otherwise;
* ``log``: one line ``desc: n/total (p%) | r unit/s | ETA 1m05s | elapsed 20s | key value``
  when at least ``interval`` seconds (default 30, ``NVAE_JAX_PROGRESS_INTERVAL``) passed since
  the last line, and a last line on ``close()`` if the loop lasted that long and the count moved
  since the previous line (loops shorter than one interval stay silent); written to ``stream`` (default stderr, so scripts that print JSON
  on stdout keep it clean);
* ``off``: nothing;
* ``auto`` (default): ``bar`` inside a Jupyter kernel, ``log`` elsewhere.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

MODES = ('auto', 'bar', 'log', 'off')
ENV_MODE = 'NVAE_JAX_PROGRESS'
ENV_INTERVAL = 'NVAE_JAX_PROGRESS_INTERVAL'
DEFAULT_INTERVAL = 30.0


def in_notebook() -> bool:
  """True inside a Jupyter kernel (Jupyter, Colab, VS Code notebooks): tqdm's own test."""
  return 'ipykernel.zmqshell' in sys.modules


def resolve_mode(mode: str | None = None) -> str:
  """``bar``, ``log`` or ``off`` for ``mode`` (None: the environment, then ``auto``)."""
  chosen = mode if mode is not None else os.environ.get(ENV_MODE, 'auto')
  chosen = chosen.strip().lower()
  if chosen not in MODES:
    source = 'mode' if mode is not None else ENV_MODE
    raise ValueError(f'{source}: expected one of {MODES}, found {chosen!r}')
  if chosen == 'auto':
    return 'bar' if in_notebook() else 'log'
  return chosen


def _interval_from_env() -> float:
  raw = os.environ.get(ENV_INTERVAL)
  if raw is None:
    return DEFAULT_INTERVAL
  try:
    value = float(raw)
  except ValueError:
    value = float('nan')
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f'{ENV_INTERVAL}: expected a number of seconds >= 0, found {raw!r}')
  return value


def format_duration(seconds: float) -> str:
  """``1h02m03s``, ``2m05s`` or ``7s``; ``?`` when unknown."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(max(0.0, seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f'{h}h{m:02d}m{s:02d}s'
  return f'{m}m{s:02d}s' if m else f'{s}s'


def _format_value(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


class Progress:
  """Progress of ``total`` items (see the module docstring); a context manager."""

  def __init__(self, total: int | None = None, desc: str = '', unit: str = 'it', *,
               mode: str | None = None, interval: float | None = None,
               stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
    if total is not None and total < 0:
      raise ValueError(f'total: expected a count >= 0 or None, found {total}')
    self.total = None if total is None else int(total)
    self.desc, self.unit = desc, unit
    self.mode = resolve_mode(mode)
    self.interval = _interval_from_env() if interval is None else float(interval)
    self.stream = stream
    self.clock = clock
    self.n = 0
    self.info: dict[str, Any] = {}
    self._t0 = clock()
    self._first: tuple[int, float] | None = None
    self._last_line = self._t0
    self._printed_n = 0  # the count shown by the last log line
    self._closed = False
    self._bar = None
    if self.mode == 'bar':
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)

  # ------------------------------------------------------------------ numbers

  def rate(self) -> float:
    """Items per second, the first update kept out once a later one arrived (nan before)."""
    now = self.clock()
    if self._first is None:
      return float('nan')
    n1, t1 = self._first
    if self.n > n1 and now > t1:
      return (self.n - n1) / (now - t1)
    return n1 / (t1 - self._t0) if t1 > self._t0 else float('nan')

  def eta(self) -> float:
    """Seconds left at the current rate (nan when the total or the rate is unknown)."""
    r = self.rate()
    if self.total is None or not (r > 0):
      return float('nan')
    return max(0, self.total - self.n) / r

  def line(self) -> str:
    """The log line for the current state."""
    count = f'{self.n}/{self.total}' if self.total is not None else f'{self.n}'
    if self.total:
      count += f' ({100.0 * self.n / self.total:.0f}%)'
    r = self.rate()
    parts = [f'{self.desc}: {count}' if self.desc else count,
             f'{r:.3g} {self.unit}/s' if math.isfinite(r) else f'? {self.unit}/s']
    if self.total is not None:
      parts.append(f'ETA {format_duration(self.eta())}')
    parts.append(f'elapsed {format_duration(self.clock() - self._t0)}')
    if self.info:
      parts.append(' '.join(f'{k} {_format_value(v)}' for k, v in self.info.items()))
    return ' | '.join(parts)

  # ------------------------------------------------------------------ updates

  def update(self, n: int = 1, **info: Any) -> None:
    """``n`` more items done; ``info`` (key/value pairs) is shown with the count."""
    self.n += int(n)
    if info:
      self.info.update(info)
    now = self.clock()
    if self._first is None:
      self._first = (self.n, now)
    if self._bar is not None:
      if info:
        self._bar.set_postfix({k: _format_value(v) for k, v in self.info.items()},
                              refresh=False)
      self._bar.update(int(n))
    elif self.mode == 'log' and now - self._last_line >= self.interval:
      self._write(self.line())
      self._last_line, self._printed_n = now, self.n

  def write(self, message: str) -> None:
    """A message that does not break the bar (``tqdm.write`` in bar mode)."""
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    elif self.mode != 'off':
      self._write(message)

  def close(self) -> None:
    """Ends the bar, or writes the last line in log mode (once, if the loop lasted an interval)."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif (self.mode == 'log' and self._first is not None and self.n != self._printed_n
          and self.clock() - self._t0 >= self.interval):
      self._write(self.line())

  def _write(self, text: str) -> None:
    stream = self.stream if self.stream is not None else sys.stderr
    print(text, file=stream, flush=True)

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(items: Iterable, total: int | None = None, desc: str = '', unit: str = 'it',
          **options: Any) -> Iterator:
  """Yields ``items`` while showing their progress (``total`` defaults to ``len(items)``)."""
  if total is None and hasattr(items, '__len__'):
    total = len(items)  # type: ignore[arg-type]
  with Progress(total, desc, unit, **options) as bar:
    for item in items:
      yield item
      bar.update(1)
