"""Files and folders replaced whole: written beside their destination, then renamed into place, so a reader
(or a run interrupted mid-write) never sees half of one. trainer.py stages its checkpoints its own way."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A fresh path beside `path` (`.NAME.<random>.partial` + `suffix`, e.g. ".png" for a writer that picks
    the format by extension) for the block to write; it replaces `path` when the block succeeds and is
    removed when it fails."""
    staging = _beside(path, suffix)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Replace `path` whole with `text` (UTF-8)."""
    with staged_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_dir(target: Path, done: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh folder beside `target` for the block to fill; renamed to `target` when the block succeeds,
    removed otherwise. When the rename fails and `done(target)` holds, another process wrote `target`
    first: theirs is kept. Any other failure is raised."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _beside(target)
    staging.mkdir()  # with the usual permissions (a tempfile.mkdtemp folder is private to its owner)
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if done is None or not done(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _beside(path: Path, suffix: str = "") -> Path:
    """A name beside `path` no other writer picks: hidden, `.NAME.<pid>-<random>.partial` + `suffix`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial{suffix}")
