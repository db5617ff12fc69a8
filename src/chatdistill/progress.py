"""Training progress bar: loss, tokens/s and ETA on one line (rich), quiet on other processes."""

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
