"""What a transcription job has done so far: counts over result batches, and the progress bar
(audio hours, running RTFx, ETA) that shows them."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from records.pseudo_labels import COL, STATUS_OK

#: The bookkeeping column that says which node's actor wrote a result row.
NODE = "node"


@dataclass
class RunStats:
    rows: int = 0
    ok: int = 0
    errors: int = 0
    audio_s: float = 0.0
    items: int = 0
    nodes: Counter[str] = field(default_factory=Counter)

    def add(self, batch: pa.Table) -> None:
        """Count a batch of result rows (segments; the first segment of an input counts it as an item)."""
        if NODE in batch.column_names:
            self.nodes.update(n for n in batch.column(NODE).to_pylist() if n is not None)
        status = batch.column(COL.status).to_pylist()
        durations = batch.column(COL.duration_s).to_pylist()
        self.rows += batch.num_rows
        self.ok += sum(1 for s in status if s == STATUS_OK)
        self.errors += sum(1 for s in status if s != STATUS_OK)
        self.audio_s += sum(d or 0.0 for s, d in zip(status, durations, strict=True) if s == STATUS_OK)
        self.items += sum(1 for k in batch.column(COL.segment_index).to_pylist() if k == 0)


class Progress:
    """A progress bar in audio hours with the running RTFx and an ETA (clips when durations are unknown)."""

    def __init__(
        self, *, quiet: bool, total_audio_s: float | None, total_items: int, plan: str, prior: RunStats
    ) -> None:
        self.quiet = quiet
        self.prior = prior
        self.total_audio_s = total_audio_s
        self.total_items = total_items
        self.plan = plan
        self.t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.quiet:
            return self
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.progress = Bar(
            TextColumn("[bold]transcribing[/bold]"),
            BarColumn(),
            TextColumn("{task.fields[audio]}"),
            TextColumn("RTFx {task.fields[rtfx]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[clips]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.progress.start()
        self.progress.console.print(f"[dim]{self.plan}[/dim]")
        total = self.total_audio_s if self.total_audio_s else self.total_items
        self.task = self.progress.add_task("t", total=total, audio="", rtfx="-", eta="-", clips="")
        return self

    def update(self, stats: RunStats) -> None:
        if self.quiet:
            return
        wall = time.perf_counter() - self.t0
        rtfx = stats.audio_s / wall if wall > 0 else 0.0  # this run's speed
        audio_s, items = stats.audio_s + self.prior.audio_s, stats.items + self.prior.items
        if self.total_audio_s:
            done, total = audio_s, self.total_audio_s
            eta_s = (total - done) / rtfx if rtfx > 0 else None
            audio = f"{audio_s / 3600:.3f}/{total / 3600:.3f} h audio"
        else:
            done, total = items, self.total_items
            rate = stats.items / wall if wall > 0 else 0.0
            eta_s = (total - done) / rate if rate > 0 else None
            audio = f"{audio_s / 3600:.3f} h audio"
        eta = "-" if eta_s is None else str(dt.timedelta(seconds=int(max(0, eta_s))))
        self.progress.update(
            self.task,
            completed=min(done, total),
            audio=audio,
            rtfx=f"{rtfx:.0f}",
            eta=eta,
            clips=f"{items}/{self.total_items} clips, {stats.errors + self.prior.errors} errors",
        )

    def __exit__(self, *exc: Any) -> None:
        if not self.quiet:
            if exc[0] is None:  # silences cut out of long recordings never count as audio: fill the bar
                self.progress.update(self.task, completed=self.progress.tasks[0].total, eta="0:00:00")
            self.progress.stop()
