"""Reading and writing the files users hold: images, video, NIfTI/DICOM, protein records."""
from __future__ import annotations

import os


def limit_from_env(name: str, default: int, unit: str) -> int:
    """A size limit a site may change with an environment variable (a positive integer)."""
    from ..errors import UsageError
    raw = os.environ.get(name, "").strip()
    try:
        limit = int(raw) if raw else default
    except ValueError:
        limit = 0
    if limit <= 0:
        raise UsageError(f"{name}={raw!r} is not a positive whole number of {unit}")
    return limit
