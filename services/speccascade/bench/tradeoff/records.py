"""The benchmark's JSONL files: append-only, one record per line, tolerant of a torn last line.

`records.jsonl` holds one record per (configuration key, task id); a rerun skips the pairs it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORDS_FILE = "records.jsonl"
CALIBRATION_FILE = "calibration.jsonl"
SUMMARY_FILE = "summary.jsonl"
BATCHED_RUNS_FILE = "batched_runs.jsonl"  # one line per batched invocation: its throughput and cost model
LATENCY_CHECK_FILE = "latency_check.jsonl"  # batched records decoded again alone: modelled vs measured

# A record's `latency`: its wall_seconds measured (decoded alone) or modelled (decoded in a batch).
MEASURED, MODELLED = "measured", "modelled"


def read_jsonl(path: Path) -> list[dict]:
    """Records in a JSONL file; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class RecordStore:
    """The records of one output directory, keyed by (configuration key, task id)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / RECORDS_FILE
        self.done = {(r["config"], r["task_id"]) for r in read_jsonl(self.path)}

    def has(self, config_key: str, task_id: str) -> bool:
        return (config_key, task_id) in self.done

    def add(self, record: dict) -> None:
        append_jsonl(self.path, record)
        self.done.add((record["config"], record["task_id"]))
