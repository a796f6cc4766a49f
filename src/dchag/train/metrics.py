"""Metrics log: one JSON object per logged step in `metrics.jsonl`, flushed as it is written.

A resumed run keeps the records of the steps before its checkpoint and drops those after it (the
interrupted attempt's steps that are trained again), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path | None, keep_before: int = 0):
        self.path = Path(path) if path else None
        self._handle = None
        self.kept: list[dict] = []
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_before > 0 and self.path.is_file():
            self.kept = [r for r in read_metrics(self.path) if r.get("step", 0) < keep_before]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in self.kept)
        os.replace(tmp, self.path)
        self._handle = self.path.open("a")

    def write(self, record: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash mid-write is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
