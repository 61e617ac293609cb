"""The checkpoint manifest: how a directory becomes a checkpoint, all at once or not at all.

A checkpoint is a Hugging Face directory (safetensors, config, tokenizer with chat template) plus
`feedloop.json`, the manifest: the content hash of every other file, what made it and with which
resolved config. Writers fill a temporary sibling directory and `publish` it: manifest written
last, then one atomic rename (`lm.checkpoint.save_pretrained` does this for a model and its
tokenizer). A directory without a manifest whose hash matches is not a checkpoint.
"""
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "feedloop.json"


class BadCheckpoint(ValueError):
    """A directory that is missing, incomplete, or does not match its manifest."""


def content_hash(path: Path) -> str:
    """sha256 over every file but the manifest: names and bytes, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A temporary directory beside `final`, removed unless `publish` renamed it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path, *, kind: str, config: dict[str, Any],
            metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash `tmp`, write its manifest, fsync, and rename it to `final`. Returns the manifest."""
    if final.exists():
        raise FileExistsError(f"checkpoint {final} exists already")
    manifest = {
        "format": 1,
        "kind": kind,
        "content_hash": content_hash(tmp),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": config,
        "metrics": metrics or {},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    os.rename(tmp, final)  # atomic on one filesystem: the checkpoint appears whole or not at all
    return manifest


def read_manifest(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a published checkpoint; with `verify`, the files must still match it."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"{path}: no readable {MANIFEST}: {e}") from e
    if verify and content_hash(Path(path)) != manifest.get("content_hash"):
        raise BadCheckpoint(f"{path}: files do not match the manifest's content hash")
    return manifest
