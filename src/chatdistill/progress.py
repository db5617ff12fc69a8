"""Progress bars (rich): training steps with loss and tokens/s; unit counts with tokens/s and ETA.

On a terminal, a live bar; in a log file or a pipe (where rich would draw nothing until the end),
a plain line at the start and then every `PLAIN_EVERY_S` seconds. Quiet where disabled (other
processes, no work)."""

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """Progress as plain lines: one at the start, then at most one every `every` seconds."""

    def __init__(self, label: str, total: int, done: int = 0, every: float = PLAIN_EVERY_S):
        self.label, self.total, self.every = label, total, every
        self.started = time.perf_counter()
        self.last = self.started
        self._line(done, "")

    def _line(self, done: int, info: str) -> None:
        elapsed = int(time.perf_counter() - self.started)
        share = f" ({done / self.total:.0%})" if self.total else ""
        parts = [f"{self.label} {done:,}/{self.total:,}{share}", info]
        parts.append(f"{elapsed // 60}:{elapsed % 60:02d} elapsed")
        print("  ".join(p for p in parts if p), flush=True)

    def show(self, done: int, info: str) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every or done >= self.total:
            self.last = now
            self._line(done, info)


def _live() -> bool:
    return Console().is_terminal


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.plain = None if _live() else PlainProgress("step", total, done)
        if self.plain:
            return
        self.bar = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        info = f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s"
        if self.plain:
            self.plain.show(record["step"], info)
            return
        self.bar.update(self.task, completed=record["step"], info=info)

    def note(self, record: dict) -> None:
        """Print an evaluation line above the bar."""
        if self.enabled:
            fields = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
            line = f"step {record['step']}: {fields}"
            if self.plain:
                print(line, flush=True)
            else:
                self.bar.console.print(line)

    def close(self) -> None:
        if self.enabled:
            if not self.plain:
                self.bar.stop()
            self.enabled = False


class RateBar:
    """Progress over `total` units with tokens/s and ETA (teacher cache, generate-data)."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        self.started, self.tokens, self.done = time.perf_counter(), 0, 0
        self.plain = None if _live() else PlainProgress(label, total)
        if self.plain:
            return
        self.bar = Progress(
            TextColumn(f"[bold]{label} " + "{task.completed:,}/{task.total:,}"),
            BarColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task(label, total=total, rate="")
        self.bar.start()

    def advance(self, n: int, tokens: int) -> None:
        """`n` more units done, which processed `tokens` tokens."""
        if self.enabled:
            self.tokens += tokens
            self.done += n
            rate = f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):,.0f} tok/s"
            if self.plain:
                self.plain.show(self.done, rate)
            else:
                self.bar.update(self.task, advance=n, rate=rate)

    def close(self) -> None:
        if self.enabled:
            if not self.plain:
                self.bar.stop()
            self.enabled = False
