"""A bundle is a folder `<name>.omedge/`: graphs, constants, manifest.json (+ its hash).

It is written into a hidden sibling folder and renamed into place, so an interrupted
or failed export never leaves a half bundle where a user would find it. Loading
checks every file's sha256 against the manifest before anything runs.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from pathlib import Path

from .errors import BundleIntegrityError, ExportError, UsageError
from .manifest import MANIFEST, MANIFEST_HASH, Manifest, read_manifest, write_manifest  # noqa: F401

SUFFIX = ".omedge"


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_path(out: str | Path, overwrite: bool = False) -> Path:
    """The bundle folder for `out` (".omedge" added); refuses an existing one unless
    overwrite, so a long export can fail fast instead of at the end."""
    out = Path(out)
    if out.suffix != SUFFIX:
        out = out.with_name(out.name + SUFFIX)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another -o")
    return out


class BundleWriter:
    """with BundleWriter(out) as w: write files under w.dir; w.commit(manifest)."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.dir: Path | None = None

    def __enter__(self):
        self.out = bundle_path(self.out, self.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir()
        return self

    def check_space(self, needed_bytes: int):
        free = shutil.disk_usage(self.dir).free
        if free < needed_bytes:
            raise ExportError(f"not enough disk space in {self.out.parent}: about {needed_bytes / 1e6:.0f} MB "
                              f"needed, {free / 1e6:.0f} MB free", "free some space or write elsewhere with -o")

    def commit(self, manifest: Manifest) -> Path:
        """Hash every file, write the manifest and its hash, rename into place."""
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = {"sha256": sha256(p), "bytes": p.stat().st_size}
        manifest.files = files
        manifest.created = manifest.created or now_iso()
        write_manifest(self.dir, manifest)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.dir, self.out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self.dir = None
        return self.out

    def __exit__(self, exc_type, exc, tb):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ExportError(f"the disk holding {self.out.parent} is full; nothing was written",
                              "free some space or write elsewhere with -o") from exc
        return False


def bundle_file(bundle: str | Path, rel: str, manifest: Manifest | None = None) -> Path:
    """`rel` resolved inside the bundle: no absolute paths, no `..`, no symlinks, and
    (given the manifest) listed in its files, so nothing outside the bundle is read."""
    bundle = Path(bundle)
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise BundleIntegrityError(f"bundle {bundle.name} names a path outside itself: {rel!r}",
                                   "the manifest was tampered with: copy the bundle again from its source")
    if manifest is not None and rel not in manifest.files:
        raise BundleIntegrityError(f"bundle {bundle.name} refers to {rel!r}, which its manifest does not list",
                                   "the manifest was tampered with: copy the bundle again from its source")
    path = bundle / rel
    for k in range(1, len(parts) + 1):
        if (bundle.joinpath(*parts[:k])).is_symlink():
            raise BundleIntegrityError(f"bundle {bundle.name}: {rel} is a symbolic link", "bundles hold plain files")
    return path


def verify_files(bundle: str | Path, manifest: Manifest, only: list[str] | None = None) -> None:
    """Raise unless every listed file exists with its recorded size and sha256."""
    bundle = Path(bundle)
    problems = []
    for rel, meta in manifest.files.items():
        if only is not None and rel not in only:
            continue
        p = bundle_file(bundle, rel)
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)")
        elif sha256(p) != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file modified)")
    if problems:
        raise BundleIntegrityError(f"bundle {bundle.name} failed its integrity check: " + "; ".join(problems),
                                   "copy the bundle again from its source; never edit files inside it")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
