"""A bundle is a folder `<name>.omedge/`: graphs, constants, manifest.json (+ its hash).

It is written into a hidden sibling folder and swapped into place, so an interrupted
or failed export never leaves a half bundle where a user would find it. Loading
checks every file's sha256 against the manifest before anything runs.

Readers hold a shared flock on the parent folder while they read files (`reading()`);
an overwrite holds it exclusively only for the swap (atomic RENAME_EXCHANGE on Linux), so
a reader sees the old bundle or the new one, never a mix or a gap. Folders, not lock
files, are locked: nothing litters the folder, and reading works on a read-only mount.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import BundleIntegrityError, ExportError, UsageError
from .manifest import MANIFEST, MANIFEST_HASH, Manifest, read_manifest, write_manifest  # noqa: F401

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, the swap is still two renames
    fcntl = None

SUFFIX = ".omedge"
LOCK_TIMEOUT_S = 60.0        # how long an overwrite waits for readers of the folder
PARTIAL_GRACE_S = 600.0      # a dead writer's partial is removed once nothing in it changed for this long
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>partial|old)-(?P<pid>\d+)(?:-\d+)?$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EIO, errno.EFBIG}
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_OV_WRITE_TEXTS = ("iostream error", "Can't open bin file", "Can't open xml file", "No space left")
_SYSTEM_ROOTS = ("/proc", "/sys")


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_path(out: str | Path, overwrite: bool = False) -> Path:
    """The bundle folder for `out` (".omedge" added); refuses an existing one unless
    overwrite, and anything that is not a bundle even then, so a long export can fail
    fast instead of at the end, and --overwrite never deletes a user's folder."""
    out = Path(out)
    if out.suffix != SUFFIX:
        out = out.with_name(out.name + SUFFIX)
    _check_location(out)
    recover(out)
    if os.path.lexists(out):
        if not overwrite:
            raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another -o")
        check_replaceable(out)
    return out


def _check_location(out: Path) -> None:
    """Refuse, before any work, an output the writer could never create."""
    hint, name_max, ancestor = "choose another -o", 255, Path(os.path.abspath(out)).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.is_dir() and hasattr(os, "pathconf"):
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    if len(os.fsencode(f".{out.name}.partial-{2**22}-99")) > name_max or len(os.fsencode(str(out))) > 4000:
        raise UsageError(f"the bundle name {out.name[:60]}... is too long for this file system "
                         f"({name_max} bytes per name, with room for the temporary folder)", "choose a shorter -o")
    if not ancestor.is_dir():
        raise UsageError(f"cannot create {out}: {ancestor} is a file, not a folder", hint)
    real = os.path.realpath(ancestor)
    if any(real == r or real.startswith(r + "/") for r in _SYSTEM_ROOTS):
        raise UsageError(f"cannot write a bundle under {real}: it is a system folder, not storage", hint)
    read_only = hasattr(os, "statvfs") and os.statvfs(ancestor).f_flag & os.ST_RDONLY
    if read_only or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {ancestor}: the folder is read-only or not writable by you", hint)


def check_replaceable(out: Path) -> None:
    """--overwrite replaces an omedge bundle, nothing else: not a file, not a link, not a
    folder of the user's own files (one with no bundle manifest, or with unlisted files)."""
    hint = "move it away yourself, or choose another -o"
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link, not a bundle folder: --overwrite will not replace it", hint)
    if not out.is_dir():
        raise UsageError(f"{out} is a file, not an omedge bundle: --overwrite replaces bundles only", hint)
    why = _not_a_bundle(out)
    if why:
        raise UsageError(f"{out} is not an omedge bundle ({why}): --overwrite would delete it, so it was left "
                         "alone", hint)


def _not_a_bundle(folder: Path) -> str | None:
    """Why `folder` is not a bundle omedge wrote, or None (a damaged one still counts)."""
    manifest = folder / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return f"it has no {MANIFEST}"
    try:
        data = json.loads(manifest.read_bytes()) if manifest.stat().st_size <= 64 << 20 else None
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or not {"schema_version", "model", "artifacts"} <= data.keys() \
            or not isinstance(data.get("files"), dict):
        return f"its {MANIFEST} is not an omedge manifest"
    known = set(data["files"]) | {MANIFEST, MANIFEST_HASH}
    unknown = []
    for root, dirs, names in os.walk(folder):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, n).relative_to(folder).as_posix()
            if rel not in known:
                unknown.append(rel)
        if len(unknown) >= 3:
            break
    return f"it holds files its manifest does not list: {', '.join(unknown[:3])}" if unknown else None


def _pid_alive(pid: int) -> bool:
    """Whether a writer's process still runs on this machine."""
    if not 0 < pid < 2**22:   # above Linux's pid_max: not a pid
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:   # someone else's live process
        return True
    except OSError:
        return False
    return True


def _leftovers(parent: Path, name: str | None = None):
    """(path, kind, pid) of writer leftovers in `parent` (`.X.omedge.partial-PID`, `.old-PID`)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m and m["name"].endswith(SUFFIX) and (name is None or m["name"] == name) \
                and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path), m["what"], int(m["pid"])


def _quiet_for(folder: Path, seconds: float) -> bool:
    """Nothing in `folder` changed for `seconds` (a live writer elsewhere keeps writing)."""
    stamps = (os.lstat(os.path.join(r, n)).st_mtime for r, ds, ns in os.walk(folder) for n in [""] + ds + ns)
    return all(t <= time.time() - seconds for t in stamps)


def recover(out: str | Path) -> bool:
    """Put back `.X.omedge.old-PID` when X.omedge is missing and writer PID is dead: it
    was killed between the two renames of the fallback swap. Never raises."""
    out = Path(out)
    try:
        if os.path.lexists(out):
            return False
        olds = [(p.stat().st_ctime, p) for p, what, pid in _leftovers(out.parent, out.name)
                if what == "old" and not _pid_alive(pid)]
        if not olds:
            return False
        src = max(olds)[1]
        if not _renameat2(src, out, _RENAME_NOREPLACE):
            os.rename(src, out)
        return True
    except OSError:
        return False


def clean_stale(parent: Path) -> None:
    """Remove what dead writers left in `parent`: partial folders nothing wrote to for
    PARTIAL_GRACE_S, and `.old-PID` copies whose bundle is back in place."""
    for path, what, pid in list(_leftovers(parent)):
        bundle = path.with_name(_LEFTOVER.match(path.name)["name"])
        try:
            if not _pid_alive(pid) and (what == "partial" and _quiet_for(path, PARTIAL_GRACE_S)
                                        or what == "old" and bundle.is_dir()):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:   # best effort: it vanished, or is not ours to read
            continue


def _renameat2(src, dst, flags: int) -> bool:
    """Linux renameat2(2); False where the C library, kernel or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(str(src)), -100, os.fsencode(str(dst)), flags) == 0:   # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def _folder_lock(folder, exclusive: bool, timeout: float | None = None):
    """flock on the folder itself; yields whether it is held. Where locks are not
    supported (no fcntl, some network file systems) it goes on without one."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        fd = None
    try:
        yield fd is not None and _flock(fd, exclusive, timeout, folder)
    finally:
        if fd is not None:
            os.close(fd)   # releases the lock


def _flock(fd: int, exclusive: bool, timeout: float | None, folder) -> bool:
    if fcntl is None:
        return False
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | (0 if deadline is None else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ExportError(f"{folder} is being read by another omedge process for over {timeout:.0f} s; "
                                  "the bundle was not replaced", "try again when it has loaded") from None
            time.sleep(0.01)
        except OSError:
            return False


_HELD = threading.local()


@contextmanager
def reading(bundle):
    """Hold the bundle's read lock while files are read: an overwrite waits, so the
    manifest and every file read under it come from one export. Re-entrant per thread."""
    key = os.path.dirname(os.path.realpath(bundle))
    held = _HELD.__dict__.setdefault("folders", set())
    if key in held:
        yield
        return
    with _folder_lock(bundle, exclusive=False):
        pass   # the turnstile: waits while an overwrite of this bundle is pending
    with _folder_lock(key, exclusive=False):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


class BundleWriter:
    """with BundleWriter(out) as w: write files under w.dir; w.commit(manifest)."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.dir: Path | None = None

    def __enter__(self):
        self.out = bundle_path(self.out, self.overwrite)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.out.parent)
            self.dir = self._make_partial()
        except OSError as e:
            raise UsageError(f"cannot create the bundle {self.out}: {e.strerror or e}", "choose another -o") from None
        return self

    def _make_partial(self) -> Path:
        """`.X.omedge.partial-PID` (-K when another thread of this process writes X too)."""
        base = f".{self.out.name}.partial-{os.getpid()}"
        for k in range(99):
            path = self.out.parent / (base if k == 0 else f"{base}-{k}")
            if not os.path.lexists(path):
                path.mkdir()   # FileExistsError if another thread won the race: its message names it
                return path
        raise FileExistsError(errno.EEXIST, "too many partial folders", base)

    def check_space(self, needed_bytes: int):
        free = shutil.disk_usage(self.dir).free
        if free < needed_bytes:
            raise ExportError(f"not enough disk space in {self.out.parent}: about {needed_bytes / 1e6:.0f} MB "
                              f"needed, {free / 1e6:.0f} MB free", "free some space or write elsewhere with -o")

    def commit(self, manifest: Manifest) -> Path:
        """Hash every file, write the manifest and its hash, swap into place."""
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = {"sha256": sha256(p), "bytes": p.stat().st_size}
        manifest.files = files
        manifest.created = manifest.created or now_iso()
        write_manifest(self.dir, manifest)
        # readers first pass a turnstile on the current bundle folder: holding it keeps new
        # readers out while the ones inside finish, so a busy server cannot starve the swap
        with _folder_lock(self.out, exclusive=True, timeout=LOCK_TIMEOUT_S), \
                _folder_lock(self.out.parent, exclusive=True, timeout=LOCK_TIMEOUT_S):
            old = self._swap()
        self.dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def _swap(self) -> Path | None:
        """Put the partial folder at `out`; return where the replaced bundle now is."""
        if not os.path.lexists(self.out):
            if not _renameat2(self.dir, self.out, _RENAME_NOREPLACE):
                os.rename(self.dir, self.out)
            return None
        if not self.overwrite:
            raise UsageError(f"{self.out} appeared while exporting", "pass --overwrite to replace it")
        check_replaceable(self.out)
        if _renameat2(self.dir, self.out, _RENAME_EXCHANGE):
            return self.dir   # the old bundle now sits in the partial folder
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        os.rename(self.out, old)   # a kill here is undone by recover()
        try:
            os.rename(self.dir, self.out)
        except BaseException:   # an error or a signal between the renames: put the old one back
            os.rename(old, self.out)
            raise
        return old

    def __exit__(self, exc_type, exc, tb):
        """Remove the partial folder; a failed write becomes an ExportError. OpenVINO reports
        a full disk as a bare RuntimeError ('basic_ios::clear: iostream error'), so the
        disk itself is asked, before the clean-up frees space."""
        io = isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS | _FULL_ERRNOS \
            or isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OV_WRITE_TEXTS)
        try:
            free = shutil.disk_usage(self.dir).free if io and self.dir is not None else None
        except OSError:
            free = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if io and (getattr(exc, "errno", None) in _FULL_ERRNOS or (free is not None and free < (16 << 20))):
            raise ExportError(f"the disk holding {self.out.parent} is full ({(free or 0) / 1e6:.0f} MB free); "
                              "nothing was written", "free some space or write elsewhere with -o") from exc
        if io:
            raise ExportError(f"could not write the bundle in {self.out.parent}: {str(exc).strip()[:300]}; "
                              "nothing was written", "check the folder's permissions and free space, or "
                              "write elsewhere with -o") from exc
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
