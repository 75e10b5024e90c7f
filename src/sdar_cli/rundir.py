"""A run directory's file names and its metrics reader (read by inspect-gates, compare, eval and resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
GATES_DIR = "gates"


def read_metrics(run_dir: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl, one per logged step; [] when there is none.

    A file that cannot be read or parsed (a line cut off by a kill) gives [] too, unless `strict`: then
    the OSError or ValueError is raised.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        if strict:
            raise
        return []
