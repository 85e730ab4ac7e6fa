"""The files inside an `omedge pack` kit besides wheels and bundles (lock, install
scripts) and the tar that holds them: plain files and folders only, every path under
the kit's own folder, owner root, fixed modes, so `tar xf` anywhere is safe."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from .errors import BundleIntegrityError

# POSIX sh: the kit's Python is checked before anything is created; a failed install
# removes the venv it created, so a refused kit leaves nothing installed.
INSTALL_SH = r"""#!/bin/sh
# Installs this omedge kit with no network: a new venv, the kit's wheels checked against
# requirements.lock (pip --no-index --require-hashes), then `omedge verify` on each bundle.
# Usage: ./install.sh [VENV]   (default ./omedge-venv; PYTHON=/path/to/python@PY@ picks the interpreter)
set -eu
KIT=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
VENV=${1:-./omedge-venv}
WANT=@PY@
PYTHON=${PYTHON:-python$WANT}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$WANT')" 2>/dev/null; then
  echo "error: this kit holds wheels for Python $WANT, and $PYTHON is not Python $WANT" >&2
  echo "  -> install Python $WANT, or run: PYTHON=/path/to/python$WANT $0 $VENV" >&2
  exit 2
fi
if [ -e "$VENV" ] || [ -L "$VENV" ]; then
  echo "error: $VENV already exists" >&2
  echo "  -> give a new folder: $0 NEW_FOLDER" >&2
  exit 2
fi
if ! "$PYTHON" -m venv "$VENV"; then
  rm -rf "$VENV"
  echo "error: could not create the venv $VENV (Debian/Ubuntu: install the python$WANT-venv package)" >&2
  exit 2
fi
export PIP_CONFIG_FILE=/dev/null   # the kit only: no pip.conf index, mirror or find-links
if ! "$VENV/bin/python" -m pip install --isolated --no-index --find-links "$KIT/wheels" --require-hashes \
    --only-binary :all: --no-cache-dir --disable-pip-version-check -q -r "$KIT/requirements.lock"; then
  rm -rf "$VENV"
  echo "error: pip refused the kit's wheels (a hash that does not match means a file changed after packing);" \
    "nothing was installed" >&2
  echo "  -> copy the kit again from its source; never edit files inside it" >&2
  exit 8
fi
for b in "$KIT"/bundles/*.omedge; do
  if ! "$VENV/bin/omedge" verify "$b"; then
    echo "error: $b failed omedge verify on this machine (the packages are installed in $VENV)" >&2
    exit 5
  fi
done
echo "omedge is installed in $VENV and every bundle verified. Predict with:"
for b in "$KIT"/bundles/*.omedge; do echo "  $VENV/bin/omedge predict $b INPUT..."; done
"""

# PowerShell for Windows targets: the same steps (untested on Windows in CI).
INSTALL_PS1 = r"""# Installs this omedge kit with no network: a new venv, the wheels checked against
# requirements.lock (pip --no-index --require-hashes), then `omedge verify` on each bundle.
# Usage: .\install.ps1 [VENV]   (default .\omedge-venv; $env:PYTHON picks the interpreter, else py -@PY@)
param([string]$Venv = ".\omedge-venv")
$Kit = Split-Path -Parent $MyInvocation.MyCommand.Path
$Want = "@PY@"
if ($env:PYTHON) { $Py = $env:PYTHON; $PyArgs = @() } else { $Py = "py"; $PyArgs = @("-$Want") }
& $Py @PyArgs -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$Want')"
if ($LASTEXITCODE -ne 0) { Write-Host "error: this kit holds wheels for Python $Want; install it, or set PYTHON"
                           exit 2 }
if (Test-Path $Venv) { Write-Host "error: $Venv already exists; give a new folder"; exit 2 }
& $Py @PyArgs -m venv $Venv
if ($LASTEXITCODE -ne 0) { Write-Host "error: could not create the venv $Venv"; exit 2 }
$env:PIP_CONFIG_FILE = "nul"
& "$Venv\Scripts\python.exe" -m pip install --isolated --no-index --find-links "$Kit\wheels" --require-hashes `
    --only-binary ":all:" --no-cache-dir --disable-pip-version-check -q -r "$Kit\requirements.lock"
if ($LASTEXITCODE -ne 0) {
    Remove-Item -Recurse -Force $Venv
    Write-Host "error: pip refused the kit's wheels (a hash mismatch means a file changed); nothing was installed"
    exit 8
}
foreach ($b in Get-ChildItem "$Kit\bundles" -Directory -Filter *.omedge) {
    & "$Venv\Scripts\omedge.exe" verify $b.FullName
    if ($LASTEXITCODE -ne 0) { Write-Host "error: $($b.Name) failed omedge verify on this machine"; exit 5 }
}
Write-Host "omedge is installed in $Venv. Predict with: $Venv\Scripts\omedge.exe predict BUNDLE INPUT..."
"""


def install_scripts(os_name: str, python: str) -> dict[str, str]:
    """install.ps1 for Windows targets, install.sh for the others."""
    if os_name == "win":
        return {"install.ps1": INSTALL_PS1.replace("@PY@", python)}
    return {"install.sh": INSTALL_SH.replace("@PY@", python)}


def lock_text(kit: dict) -> str:
    lines = [f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}" for w in kit["wheels"]]
    return "# omedge kit: every wheel in wheels/, pinned with its sha256 (pip --require-hashes)\n" + \
        "\n".join(lines) + "\n"


class _HashingReader:
    """Hashes a bundle file as it streams into the tar: what is packed is what was checked."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n=-1):
        block = self.f.read(n)
        self.h.update(block)
        return block


def write_tar(tmp: Path, name: str, bundles: list, wheel_dir: Path, kit: dict, os_name: str) -> None:
    """The kit as one tar at `tmp` (renamed into place by the caller), synced to disk."""
    from .bundle import reading
    texts = {"kit.json": json.dumps(kit, indent=2) + "\n", "requirements.lock": lock_text(kit),
             **install_scripts(os_name, kit["python"])}
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_dir(tar, name)
            for rel, text in texts.items():
                _add_bytes(tar, f"{name}/{rel}", text.encode(), 0o755 if rel.startswith("install.") else 0o644)
            _add_dir(tar, f"{name}/wheels")
            for w in kit["wheels"]:
                with open(wheel_dir / w["file"], "rb") as src:
                    _add_file(tar, f"{name}/wheels/{w['file']}", src, os.fstat(src.fileno()).st_size)
            _add_dir(tar, f"{name}/bundles")
            for b in bundles:
                with reading(b.path):   # an overwrite of the bundle waits until it is packed
                    _add_bundle(tar, f"{name}/bundles/{b.path.name}", b)
        f.flush()
        os.fsync(f.fileno())


def _add_bundle(tar, prefix: str, b) -> None:
    from .bundle import bundle_file
    dirs = set()
    for rel in b.files:
        for k in range(1, len(Path(rel).parts)):
            d = "/".join((prefix, *Path(rel).parts[:k]))
            if d not in dirs:
                dirs.add(d)
                _add_dir(tar, d)
        with open(bundle_file(b.path, rel), "rb") as src:
            reader = _HashingReader(src)
            _add_file(tar, f"{prefix}/{rel}", reader, os.fstat(src.fileno()).st_size)
        expected = b.manifest.files.get(rel, {}).get("sha256")
        if expected and reader.h.hexdigest() != expected:
            raise BundleIntegrityError(f"{b.path.name}/{rel} changed while it was packed",
                                       "copy the bundle again from its source, then pack again")


def _info(arcname: str, kind, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, int(time.time())
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_dir(tar, arcname: str) -> None:
    tar.addfile(_info(arcname, tarfile.DIRTYPE, 0, 0o755))


def _add_bytes(tar, arcname: str, data: bytes, mode: int) -> None:
    tar.addfile(_info(arcname, tarfile.REGTYPE, len(data), mode), io.BytesIO(data))


def _add_file(tar, arcname: str, fileobj, size: int) -> None:
    tar.addfile(_info(arcname, tarfile.REGTYPE, size, 0o644), fileobj)
