"""Rank 0's view of training: a rich progress bar on a terminal, plain lines in logs, a summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class TrainProgress:
    def __init__(self, console: Console, *, total_steps: int, start_step: int) -> None:
        self.console = console
        self.live = console.is_terminal and not console.quiet
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not self.live,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, epoch=0, loss=0.0,
                                      lr=0.0, rate="")
        self.bar.start()

    def advance(self, step: int) -> None:
        """Every step: the bar moves on host numbers alone."""
        self.bar.update(self.task, completed=step)

    def update(self, *, step: int, epoch: int, loss: float, lr: float, tokens_per_second: float,
               mfu: float | None = None) -> None:
        """On log steps: the numbers read from the device, and a plain line where there is no live bar."""
        rate = f"{tokens_per_second:,.0f} tok/s" + (f"  MFU {mfu:.1%}" if mfu is not None else "")
        self.bar.update(self.task, completed=step, epoch=epoch, loss=loss, lr=lr, rate=rate)
        if not self.live and not self.console.quiet:
            self.console.print(f"step {step} epoch {epoch} loss {loss:.4f} lr {lr:.3e} {rate}", highlight=False)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        self.bar.stop()


def summary_table(rows: dict[str, str]) -> Table:
    table = Table(title="bookgen run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, value)
    return table
