"""A Hugging Face cache laid out by hand (no network): `models--ORG--NAME/` with content-addressed
`blobs/`, `snapshots/<commit>/` of symlinks to them and `refs/<branch>` naming the commit, as
huggingface_hub writes it, so `snapshot_download(..., local_files_only=True)` finds it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main",
                 skip: tuple[str, ...] = ()) -> Path:
    """Put `folder`'s files in `cache` as repo `repo_id` at branch `revision`; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in skip)
    commit = hashlib.sha1(("".join(p.name for p in files) + revision).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / p.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
