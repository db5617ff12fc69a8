"""Progress bars (rich): training steps with loss and tokens/s; unit counts with tokens/s and ETA.

Quiet where disabled (other processes, no work)."""

import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
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
        self.bar.update(self.task, completed=record["step"], info=info)

    def note(self, record: dict) -> None:
        """Print an evaluation line above the bar."""
        if self.enabled:
            fields = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
            self.bar.console.print(f"step {record['step']}: {fields}")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False


class RateBar:
    """Progress over `total` units with tokens/s and ETA (teacher cache, generate-data)."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        self.bar = Progress(
            TextColumn(f"[bold]{label} " + "{task.completed:,}/{task.total:,}"),
            BarColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task(label, total=total, rate="")
        self.started, self.tokens = time.perf_counter(), 0
        self.bar.start()

    def advance(self, n: int, tokens: int) -> None:
        """`n` more units done, which processed `tokens` tokens."""
        if self.enabled:
            self.tokens += tokens
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:,.0f} tok/s")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False
