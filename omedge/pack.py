"""`omedge pack`: one tar that installs bundles on a machine with no network.

The kit holds the bundle(s), every run-side wheel for the target platform and Python
(pip downloads them here, on a connected workstation), `requirements.lock` with each
wheel's sha256, `kit.json`, and an install script: a fresh venv, `pip install --no-index
--require-hashes`, then `omedge verify` on every bundle. What the run side needs is read
from the omedge wheel's own metadata (its dependencies plus the extras for the backends
and the bundles' kinds), so no second list has to follow pyproject.toml. Build-side
packages (torch, nncf, transformers) never enter a kit.
"""
from __future__ import annotations

import email.parser
import os
import platform as _host
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError, UsageError
from .pack_files import write_tar

KIT_FORMAT = "omedge-kit/1"
BACKEND_EXTRAS = {"onnxruntime": (), "openvino": ("openvino",), "llama.cpp": ("llm",)}  # onnxruntime is core
NOT_RUN_SIDE_EXTRAS = {"export", "test"}
BUILD_SIDE = {"torch", "nncf", "transformers", "onnxscript"}
# --platform -> (marker OS, machine as the target's Python reports it, pip platform tags)
_LINUX = tuple(f"manylinux_2_{m}" for m in range(28, 16, -1)) + ("manylinux2014",)  # glibc 2.28 (RHEL 8) and older
PLATFORMS = {
    "linux-x86_64": ("linux", "x86_64", tuple(f"{t}_x86_64" for t in _LINUX) + ("linux_x86_64",)),
    "linux-aarch64": ("linux", "aarch64", tuple(f"{t}_aarch64" for t in _LINUX) + ("linux_aarch64",)),
    "win-amd64": ("win", "AMD64", ("win_amd64",)),
    "macos-arm64": ("macos", "arm64", ("macosx_14_0_arm64",)),   # pip adds macOS 11-13 itself
}
_MARKER_OS = {"linux": ("linux", "Linux", "posix"), "win": ("win32", "Windows", "nt"),
              "macos": ("darwin", "Darwin", "posix")}
_NET_ERRORS = ("Failed to establish a new connection", "Temporary failure in name resolution", "ProxyError",
               "Network is unreachable", "Name or service not known", "Could not fetch URL", "timed out")


@dataclass(frozen=True)
class Target:
    """The machine the kit is for: platform key, Python X.Y and pip's platform tags."""
    platform: str
    python: str
    os: str
    machine: str
    tags: tuple[str, ...]

    def pip_args(self) -> list[str]:
        args = ["--only-binary", ":all:", "--implementation", "cp", "--python-version", self.python,
                "--abi", "cp" + self.python.replace(".", "")]
        for tag in self.tags:
            args += ["--platform", tag]
        return args

    def marker_env(self, extra: str = "") -> dict:
        """PEP 508 marker values on the target: pip evaluates markers for *this* machine."""
        sys_platform, system, os_name = _MARKER_OS[self.os]
        return {"sys_platform": sys_platform, "platform_system": system, "os_name": os_name,
                "platform_machine": self.machine, "python_version": self.python,
                "python_full_version": self.python + ".0", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
                "implementation_version": self.python + ".0", "extra": extra}


def host_platform() -> str:
    """This machine's --platform key (the default)."""
    machine = _host.machine().lower()
    system = {"linux": "linux", "windows": "win", "darwin": "macos"}.get(_host.system().lower(), "?")
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) if system == "linux" else \
        {"x86_64": "amd64"}.get(machine, machine) if system == "win" else machine
    return f"{system}-{arch}"


def target(platform: str | None = None, python: str | None = None) -> Target:
    platform = platform or host_platform()
    python = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not re.fullmatch(r"3\.\d{1,2}", python) or int(python.split(".")[1]) < 10:
        raise UsageError(f"--python {python!r}: give the target's CPython version as 3.X (3.10 or newer)",
                         "e.g. --python 3.11; omedge needs Python 3.10+")
    if platform in PLATFORMS:
        os_, machine, tags = PLATFORMS[platform]
        return Target(platform, python, os_, machine, tags)
    m = re.fullmatch(r"manylinux_2_(\d+)_(x86_64|aarch64)", platform)
    if m:   # a pip tag for a newer glibc than the default: that one and every older manylinux
        tags = tuple(f"manylinux_2_{k}_{m[2]}" for k in range(int(m[1]), 16, -1)) + (f"manylinux2014_{m[2]}",)
        return Target(platform, python, "linux", m[2], tags + (f"linux_{m[2]}",))
    raise UsageError(f"unknown --platform {platform!r}", f"choose from {', '.join(PLATFORMS)}, or a tag like "
                     "manylinux_2_31_x86_64 for a newer glibc")


@dataclass
class _Bundle:
    path: Path
    manifest: object
    files: list[str] = field(default_factory=list)


def pack(bundles, out, backends=None, platform=None, python=None, extras=(), wheels=(), overwrite=False,
         log=lambda msg: None) -> dict:
    """Write the kit OUT.tar (unpacking to OUT/); returns its kit.json plus path and size.
    Bundles are verified first; the tar is written beside OUT and renamed into place."""
    tgt = target(platform, python)
    out, name = _kit_path(out, overwrite)
    items = [_checked_bundle(b) for b in bundles]
    if len({b.path.name for b in items}) < len(items):
        raise UsageError("two bundles have the same folder name", "rename one: a kit holds bundles by name")
    chosen = _backends(items, backends)
    given = [_given_wheel(w) for w in wheels]
    _clean_stale(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        wheel_dir = staging / "wheels"
        wheel_dir.mkdir()
        own = _omedge_wheel(staging, given)
        meta = wheel_metadata(own)
        wanted = _extras(meta, items, chosen, extras)
        log(f"downloading the run-side wheels for {tgt.platform}, Python {tgt.python} (pip)")
        _download(tgt, own, wanted, given, wheel_dir, staging)
        kit = _kit_record(tgt, items, chosen, wanted, wheel_dir, meta["Version"])
        log(f"writing {out}")
        tmp = staging / "kit.tar"
        write_tar(tmp, name, items, wheel_dir, kit, tgt.os)
        if os.path.lexists(out) and not overwrite:
            raise UsageError(f"{out} appeared while packing", "pass --overwrite to replace it")
        os.replace(tmp, out)
    except OSError as e:   # a full disk, a folder that went read-only: no kit rather than a traceback
        raise ExportError(f"could not write the kit in {out.parent}: {e.strerror or e}; nothing was written",
                          "check the free space and permissions there, or write elsewhere with -o") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**kit, "kit": str(out), "bytes": out.stat().st_size}


def _clean_stale(out: Path) -> None:
    """Remove what a killed pack of the same kit left (`.KIT.tar.partial-PID-*` of a dead PID)."""
    from .bundle import _pid_alive
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name[len(f".{out.name}.partial-"):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _kit_path(out, overwrite: bool) -> tuple[Path, str]:
    """OUT.tar and the folder name it unpacks to; an existing output only with --overwrite,
    and then only a tar file (never a folder, link or another kind of file)."""
    out = Path(out)
    if out.suffix != ".tar":
        out = out.with_name(out.name + ".tar")
    if os.path.lexists(out):
        if not overwrite:
            raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another -o")
        if out.is_symlink() or not out.is_file() or not tarfile.is_tarfile(out):
            raise UsageError(f"{out} is not a kit tar file: --overwrite replaces kits only, so it was left alone",
                             "move it away yourself, or choose another -o")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {out.parent}: not an existing, writable folder", "choose another -o")
    return out, out.name[:-len(".tar")]


def _checked_bundle(bundle) -> _Bundle:
    """Manifest hash, schema, signature (where OMEDGE_TRUSTED_KEYS is set) and every file."""
    from .manifest import MANIFEST, MANIFEST_HASH
    from .runtime.predictor import open_bundle
    from .signing import SIGNATURE
    path, manifest = open_bundle(bundle)
    files = sorted(manifest.files) + [MANIFEST, MANIFEST_HASH]
    if (path / SIGNATURE).is_file() and not (path / SIGNATURE).is_symlink():
        files.append(SIGNATURE)
    return _Bundle(path, manifest, files)


def _backends(items: list[_Bundle], asked) -> list[str]:
    """The asked backends (each must run every bundle), or all the bundles are verified on."""
    verified = list(dict.fromkeys(n for b in items for a in b.manifest.artifacts for n in a.verified_backends))
    chosen = list(dict.fromkeys(asked)) if asked else verified
    unknown = [n for n in chosen if n not in BACKEND_EXTRAS]
    if unknown:
        raise UsageError(f"unknown backend {', '.join(unknown)}", f"choose from {', '.join(BACKEND_EXTRAS)}")
    for b in items:
        own = {n for a in b.manifest.artifacts for n in a.verified_backends}
        if not own & set(chosen):
            raise UsageError(f"{b.path.name} has no artifact verified on {', '.join(chosen)}",
                             f"it runs on {', '.join(sorted(own)) or 'no backend'}: pass --backend with one of them")
    return chosen


def _given_wheel(path) -> Path:
    path = Path(path)
    if path.suffix != ".whl" or not path.is_file() or not zipfile.is_zipfile(path):
        raise UsageError(f"--wheel {path}: not a wheel file", "give a .whl that `pip wheel` built")
    return path


def wheel_name(path) -> tuple[str, str]:
    """(normalised project name, version) from a wheel's file name."""
    parts = Path(path).name[:-len(".whl")].split("-")
    return re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[1]


def wheel_metadata(path) -> email.message.Message:
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise UsageError(f"{Path(path).name} is not a wheel (no .dist-info/METADATA)")
        return email.parser.HeaderParser().parsestr(z.read(name).decode("utf-8", "replace"))


def _omedge_wheel(staging: Path, given: list[Path]) -> Path:
    """omedge itself: a wheel given with --wheel, or one built from this source tree (a
    copy of it, so the tree gets no build/ or egg-info). It is pure Python (py3-none-any)."""
    for w in given:
        if wheel_name(w)[0] == "omedge":
            return w
    root = Path(__file__).resolve().parent.parent
    project = root / "pyproject.toml"
    if not project.is_file() or not re.search(r'(?m)^name\s*=\s*"omedge"', project.read_text()):
        raise UsageError("this omedge was installed from a wheel, not a source tree, so pack cannot build it",
                         "pass the omedge wheel with --wheel omedge-VERSION-py3-none-any.whl")
    src = staging / "src"
    shutil.copytree(root / "omedge", src / "omedge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for extra in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / extra).is_file():
            shutil.copy2(root / extra, src / extra)
    isolation = [] if _has("setuptools") else ["--use-pep517"]   # without setuptools here pip fetches it
    proc = _pip(["wheel", "--no-deps", *(isolation or ["--no-build-isolation"]), "-w", str(staging / "own"),
                 str(src)])
    if proc.returncode:
        raise ExportError("could not build the omedge wheel: " + _summary(proc), "run `pip wheel --no-deps .` in "
                          "the source tree to see why, or pass a built wheel with --wheel")
    return next((staging / "own").glob("omedge-*.whl"))


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _extras(meta, items: list[_Bundle], backends: list[str], asked) -> list[str]:
    """omedge extras the kit installs: the backends', the kinds', and the ones asked for."""
    from .kinds import get_kind
    wanted = [e for n in backends for e in BACKEND_EXTRAS[n]]
    for b in items:
        kind = b.manifest.kind
        wanted += get_kind(kind).run_extras
    wanted += [e.strip() for a in asked for e in a.split(",") if e.strip()]
    provided = set(meta.get_all("Provides-Extra") or []) - NOT_RUN_SIDE_EXTRAS
    bad = [e for e in wanted if e not in provided]
    if bad:
        raise UsageError(f"omedge has no run-side extra {', '.join(bad)}",
                         f"choose from {', '.join(sorted(provided))} ('export' and 'test' are not run-side)")
    return sorted(set(wanted))


def _download(tgt: Target, own: Path, extras: list[str], given: list[Path], wheel_dir: Path, staging: Path):
    """pip download of omedge[extras] and everything it needs, as wheels for the target;
    then the dependencies whose markers only the target satisfies (pip evaluates markers
    for this machine), pinned to what is already there."""
    links = staging / "given"
    links.mkdir()
    for w in given:
        shutil.copy2(w, links / w.name)
    common = ["download", "-d", str(wheel_dir), "--find-links", str(links), "--progress-bar", "off",
              *tgt.pip_args()]
    root = f"{own}[{','.join(extras)}]" if extras else str(own)
    _pip_ok(_pip([*common, root]), tgt)
    for _ in range(5):
        missing = _missing_for_target(wheel_dir, tgt, extras)
        if not missing:
            break
        pins = staging / "pins.txt"
        pins.write_text("".join(f"{n}=={v}\n" for n, v in map(wheel_name, wheel_dir.glob("*.whl"))))
        _pip_ok(_pip([*common, "-c", str(pins), *missing]), tgt)
    if not (wheel_dir / own.name).is_file():
        shutil.copy2(own, wheel_dir / own.name)
    names = [wheel_name(w)[0] for w in wheel_dir.glob("*.whl")]
    build = sorted(BUILD_SIDE & set(names))
    if build:
        raise ExportError(f"the run-side requirements pulled in build-side packages: {', '.join(build)}",
                          "an extra given with --extra depends on them; leave it out")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExportError(f"two versions of {', '.join(twice)} were downloaded", "pin one version with --wheel")


def _missing_for_target(wheel_dir: Path, tgt: Target, extras: list[str]) -> list[str]:
    """Requirements that hold on the target but have no wheel in the kit."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    have = {wheel_name(w)[0]: w for w in wheel_dir.glob("*.whl")}
    wanted = {"omedge": set(extras)}
    missing, seen = [], set()
    while wanted:
        name, asked = wanted.popitem()
        if (name, frozenset(asked)) in seen or name not in have:
            continue
        seen.add((name, frozenset(asked)))
        for line in wheel_metadata(have[name]).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate(tgt.marker_env(e)) for e in [""] + sorted(asked)):
                continue
            dep = re.sub(r"[-_.]+", "-", req.name).lower()
            if dep not in have:
                missing.append(f"{req.name}{req.specifier}")
            wanted.setdefault(dep, set()).update(req.extras)
    return sorted(set(missing))


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _pip_ok(proc: subprocess.CompletedProcess, tgt: Target) -> None:
    """pip's failure as one error naming the package, instead of its whole output."""
    if proc.returncode == 0:
        return
    text = proc.stderr + proc.stdout
    m = re.search(r"No matching distribution found for (\S+)", text)
    if m:
        req = m[1]
        hint = f"build it on a {tgt.platform} machine with Python {tgt.python} (`pip wheel '{req}' --no-deps -w " \
            "DIR`) and pass it with --wheel DIR/FILE.whl"
        if tgt.os == "linux":
            glibc = ".".join(tgt.tags[0].split("_")[1:3])
            hint += f"; or, where the target's glibc is newer than {glibc} (`ldd --version` there), say so: " \
                f"--platform manylinux_2_35_{tgt.machine}"
        raise ExportError(f"no wheel of {req} for Python {tgt.python} on {tgt.platform} ({tgt.tags[0]} and older): "
                          "the index has only source code or other platforms for it", hint)
    if any(s in text for s in _NET_ERRORS):
        raise ExportError("pip could not reach the package index: " + _summary(proc),
                          "run pack on a connected workstation, or point pip.conf at the site's mirror")
    raise ExportError("pip could not download the wheels: " + _summary(proc), "run with --debug for pip's output")


def _summary(proc: subprocess.CompletedProcess) -> str:
    lines = [s.strip() for s in (proc.stderr + proc.stdout).splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("ERROR")] or lines
    return " / ".join(errors[-3:])[:600]


def _sha256(path: Path) -> str:
    from .bundle import sha256
    return sha256(path)


def _kit_record(tgt: Target, items, backends, extras, wheel_dir: Path, version: str) -> dict:
    from .bundle import now_iso
    from .manifest import stored_hash
    wheels = [{"file": w.name, "name": wheel_name(w)[0], "version": wheel_name(w)[1], "sha256": _sha256(w)}
              for w in sorted(wheel_dir.glob("*.whl"))]
    bundles = [{"path": f"bundles/{b.path.name}", "model": b.manifest.model["id"],
                "variant": b.manifest.model["variant"], "kind": b.manifest.kind,
                "manifest_sha256": stored_hash(b.path)} for b in items]
    return {"format": KIT_FORMAT, "created": now_iso(), "omedge_version": version, "platform": tgt.platform,
            "platform_tags": list(tgt.tags), "python": tgt.python, "backends": backends, "extras": extras,
            "bundles": bundles, "wheels": wheels}
