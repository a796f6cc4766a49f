"""Metrics log: one JSON object per logged step in `metrics.jsonl`, flushed as it is written."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._handle = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w")

    def write(self, record: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
