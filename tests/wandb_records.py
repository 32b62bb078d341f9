"""Read the records of an offline wandb run (``run-<id>.wandb``) the way ``wandb sync`` does, to check in tests
what would be uploaded: the run (name, group, job type), its history, summary and config.

The file is a W&B header (``:W&B``, a 2-byte magic, a version byte) followed by LevelDB-log framed records in
32 KiB blocks: a 4-byte checksum, a 2-byte little-endian length and a 1-byte type (full, first, middle, last)
per fragment; each record is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending, found = HEADER, b"", []
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # the rest of a block too small for a header is padding
            position += BLOCK - position % BLOCK
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        if kind == 0 and length == 0:
            break
        fragment = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        pending = fragment if kind in (FULL, FIRST) else pending + fragment
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def complete_records(run_folder: Path, wait_s: float = 30.0) -> list[Any]:
    """The records of the run in ``run_folder`` once its file holds the exit record. wandb's service completes
    the file after ``run.finish()`` has returned, so a run logged in this process is read only when whole."""
    deadline = time.monotonic() + wait_s
    while True:
        found = list(run_folder.glob("run-*.wandb"))
        try:
            complete = records(found[0]) if len(found) == 1 else []
        except Exception:  # a record being written: read again
            complete = []
        if any(record.WhichOneof("record_type") == "exit" for record in complete):
            return complete
        assert time.monotonic() < deadline, f"{run_folder} holds no complete wandb run after {wait_s} s"
        time.sleep(0.05)


def read_run(run_folder: Path) -> dict[str, Any]:
    """``{"run": Record.run, "history": [dict per log call], "summary": dict, "config": dict}`` of the offline
    run in ``run_folder`` (a ``wandb/offline-run-*`` folder), once wandb has written all of it."""
    result: dict[str, Any] = {"run": None, "history": [], "summary": {}, "config": {}}
    for record in complete_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run"] = record.run
            result["config"].update(_items(record.run.config.update))
        elif kind == "history":
            result["history"].append(_items(record.history.item))
        elif kind == "summary":
            result["summary"].update(_items(record.summary.update))
        elif kind == "config":
            result["config"].update(_items(record.config.update))
    return result
