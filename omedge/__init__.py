"""omedge: OpenMEDLab foundation models as verified, offline deployment bundles.

Importing omedge changes nothing in the caller's process: telemetry opt-outs are
applied by omedge.offline where omedge itself calls those libraries."""

__version__ = "0.2.0"

from .errors import OmedgeError  # noqa: E402
from .runtime import load  # noqa: E402


def export(*args, **kwargs):
    """Build side (needs `omedge[export]`): see omedge.exporters.export. Every model id
    works here, PULSE included. (The subpackage is not called `export` so that it cannot
    shadow this function.)"""
    from .exporters import export as _export
    return _export(*args, **kwargs)


__all__ = ["export", "load", "OmedgeError", "__version__"]


def __getattr__(name):
    """`omedge.wsi`, `omedge.pack`, ... on first use (they import optional libraries)."""
    if name in ("wsi", "pack", "profile", "medlsam", "pictures"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'omedge' has no attribute {name!r}")
