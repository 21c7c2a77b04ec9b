"""Streaming writer for the simulator: buckets lines per export day and flushes days in order."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from datetime import date, timedelta
from pathlib import Path


class DayWriter:
    """Collects NDJSON lines per export day and writes `export-YYYY-MM-DD.ndjson[.gz]` files.

    Lines of a day are kept in the order they were appended, so the 1-based line number of a
    line is known when it is appended. When the buffered text grows past `spill_bytes`, buckets
    are appended to per-day files in a private temporary folder (never the landing folder, which a
    sensor may watch), which keeps memory bounded at any run size.
    """

    def __init__(self, out_dir: Path, start: date, *, gzip_files: bool = False,
                 spill_bytes: int = 256 * 1024 * 1024) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.start = start
        self.gzip_files = gzip_files
        self.spill_bytes = spill_bytes
        self.buckets: dict[int, list[str]] = {}
        self.line_counts: dict[int, int] = {}
        self.buffered = 0
        self.flushed_before = 0  # every day < this one is written and closed
        self.files: dict[str, int] = {}  # file name -> lines, in day order
        self._spill_dir: str | None = None
        self._spilled: set[int] = set()

    def file_name(self, day: int) -> str:
        d = self.start + timedelta(days=day)
        return f"export-{d.isoformat()}.ndjson" + (".gz" if self.gzip_files else "")

    def append(self, day: int, line: str) -> int:
        """Queue one line (without newline) for the export of `day`; returns its line number."""
        if day < self.flushed_before:
            raise ValueError(f"day {day} was already written (internal ordering error)")
        bucket = self.buckets.get(day)
        if bucket is None:
            bucket = self.buckets[day] = []
        bucket.append(line)
        n = self.line_counts.get(day, 0) + 1
        self.line_counts[day] = n
        self.buffered += len(line) + 1
        if self.buffered > self.spill_bytes:
            self._spill()
        return n

    def _spill(self) -> None:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="alliance-sim-")
        for day, lines in self.buckets.items():
            if lines:
                with open(os.path.join(self._spill_dir, f"{day}.part"), "a", encoding="utf-8") as f:
                    f.write("\n".join(lines))
                    f.write("\n")
                self._spilled.add(day)
                lines.clear()
        self.buffered = 0

    def flush_before(self, day: int) -> None:
        """Write every day earlier than `day` (no later line can belong to them)."""
        for d in sorted(k for k in self.line_counts if k < day and k >= self.flushed_before):
            self._write_day(d)
        self.flushed_before = max(self.flushed_before, day)

    def _write_day(self, day: int) -> None:
        lines = self.buckets.pop(day, [])
        name = self.file_name(day)
        final = self.out_dir / name
        # A hidden partial name, then an atomic rename: a sensor never sees a half-written export.
        partial = self.out_dir / f".{name}.partial"
        with open(partial, "wb") as raw:
            sink = (gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
                    if self.gzip_files else raw)
            if day in self._spilled and self._spill_dir is not None:
                part = os.path.join(self._spill_dir, f"{day}.part")
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, sink)
                os.remove(part)
            if lines:
                sink.write(("\n".join(lines) + "\n").encode("utf-8"))
            if sink is not raw:
                sink.close()
        os.replace(partial, final)
        self.buffered -= sum(len(x) + 1 for x in lines)
        self.files[name] = self.line_counts[day]

    def close(self) -> None:
        """Write every remaining day and remove the spill folder."""
        self.flush_before(max(self.line_counts, default=-1) + 1)
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
