"""What makes a run directory safe to continue: whole checkpoints, one process at a time, and the
settings a resumed run may change.

A checkpoint is whole when every file resume or `sdar eval` reads is there and complete: the adapter
(config + safetensors), the trainer state (JSON), and the optimizer, scheduler and RNG states (zip
archives written by torch.save). The checks read headers and central directories only, never the
tensors, so they take milliseconds even for large checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
CONFIG_CHANGES_FILE = "config-changes.jsonl"

#: settings a resumed run may change: they decide how long it trains, what it writes and where it logs,
#: never what the steps already trained computed (any other change is refused)
SAFE_TO_CHANGE = (
    "train.max_steps",
    "train.save_steps",
    "train.report_to",
    "train.device",
    "train.logprob_batch_size",
    "train.max_nonfinite_updates",
    "env.workers",
    "env.step_timeout_s",
    "env.reset_timeout_s",
    "output.",
    "eval.",
    "warmup.",
)


class RunInUse(RuntimeError):
    """Another process holds the run directory."""


_ADAPTER_FILES = {"adapter_config.json": "json", "adapter_model.safetensors": "safetensors"}
_RESUME_FILES = {"trainer_state.json": "json", "optimizer.pt": "zip", "scheduler.pt": "zip"}


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from or evaluated (None: it is whole)."""
    rng_states = {path.name: "zip" for path in checkpoint.glob("rng_state*.pth")}
    return _files_problem(checkpoint, {**_ADAPTER_FILES, **_RESUME_FILES, **rng_states})


def adapter_problem(folder: Path) -> str | None:
    """Why the adapter in `folder` cannot be loaded (None: its files are whole; older PEFT's pickled
    adapter_model.bin is taken as it is)."""
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists():
        return _files_problem(folder, {"adapter_config.json": "json"})
    return _files_problem(folder, _ADAPTER_FILES)


def _files_problem(folder: Path, files: dict[str, str]) -> str | None:
    checks = {"json": _json_problem, "safetensors": _safetensors_problem, "zip": _zip_problem}
    for name, kind in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        problem = checks[kind](path)
        if problem:
            return f"{name} {problem}"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "is not valid JSON (cut off?)"
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return "is cut off"
    except (OSError, zipfile.BadZipFile):
        return "is cut off or damaged"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The safetensors layout: an 8-byte header length, a JSON header, then the tensors' bytes, whose
    end the header's largest data offset gives."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > size - 8:
                return "is cut off"
            header = json.loads(handle.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return "is cut off or damaged"
    return "is cut off" if 8 + header_length + end > size else None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (RunInUse if another process holds it).

    The lock is an flock on run_dir/.lock: the operating system releases it when the process ends, even
    by SIGKILL, so a killed run never leaves a stale lock behind. A run directory this call created and
    that holds nothing else when the lock is released is removed again (a run that never started leaves
    nothing behind).
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = path.open("a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(f"pid {_holder(path)}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            path.unlink()
            run_dir.rmdir()
        handle.close()


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b.c": value} (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for every setting that differs."""
    before, after = flat_settings(saved), flat_settings(current)
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)}


def is_safe_change(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE)


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line to config-changes.jsonl: the checkpoint step resumed from and each key's old and new value."""
    line = {"resumed_from_step": step, "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
    with (run_dir / CONFIG_CHANGES_FILE).open("a") as handle:
        handle.write(json.dumps(line) + "\n")
