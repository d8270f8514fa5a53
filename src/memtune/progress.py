"""Progress that stays readable in a log: a tqdm bar on a terminal, periodic one-line summaries elsewhere.

    bar = Progress(total=400, desc="lora", items_per_update=16)      # items: samples per step
    for ...:
        bar.update(loss=0.53)
    bar.close()

On a terminal (stderr is a TTY) it is a tqdm bar. Otherwise a bar would write one line per refresh, so a
summary line is printed instead every `every_s` seconds and at every `every_fraction` of the total:

    lora: step 120/400 (30 %), loss 0.5312, 41.7 samples/s, 0:00:46 elapsed, ETA 0:01:47
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds))))


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0, unit: str = "step",
                 items_per_update: int | None = None, item_unit: str = "samples", every_s: float = 30.0,
                 every_fraction: float | None = 0.1, leave: bool = True, stream=None, clock=time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.items_per_update, self.item_unit = items_per_update, item_unit
        self.every_s, self.every_fraction = every_s, every_fraction
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.n = self.start_n = initial
        self.postfix: dict[str, float] = {}
        self.enabled = enabled and total > 0
        self.bar = None
        if self.enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                            file=self.stream)
        self.started = self.last_print = clock()
        self.next_mark = self._mark_after(initial)
        self.lines, self.printed_n = 0, None

    def _mark_after(self, n: int) -> int | None:
        """The next step count at a whole multiple of every_fraction of the total."""
        if not self.every_fraction:
            return None
        step = max(1, round(self.total * self.every_fraction))
        return (n // step + 1) * step

    def update(self, n: int = 1, **postfix: float) -> None:
        if not self.enabled:
            return
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.postfix.items()}
                                     | self._rate_postfix(), refresh=False)
            return
        now = self.clock()
        at_mark = self.next_mark is not None and self.n >= self.next_mark
        if at_mark or now - self.last_print >= self.every_s:
            self._print(now)
            if at_mark:
                self.next_mark = self._mark_after(self.n)

    def _rate(self, now: float) -> float | None:
        elapsed = now - self.started
        return (self.n - self.start_n) / elapsed if elapsed > 0 and self.n > self.start_n else None

    def _rate_postfix(self) -> dict[str, str]:
        rate = self._rate(self.clock())
        if rate is None or not self.items_per_update:
            return {}
        return {f"{self.item_unit}/s": f"{rate * self.items_per_update:.1f}"}

    def summary(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / self.total:.0f} %)"]
        parts += [f"{k} {v:.4f}" for k, v in self.postfix.items()]
        rate = self._rate(now)
        if rate is not None and self.items_per_update:
            parts.append(f"{rate * self.items_per_update:.1f} {self.item_unit}/s")
        parts.append(f"{_clock(now - self.started)} elapsed")
        if rate is not None and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        print(self.summary(now), file=self.stream, flush=True)
        self.last_print, self.printed_n = now, self.n
        self.lines += 1

    def write(self, line: str) -> None:
        """A message between progress updates (above the bar on a terminal, its own line in a log)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar; in a log, print the final state unless the last line already showed it."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.n != self.printed_n:
            self._print(self.clock())
        self.enabled = False


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
