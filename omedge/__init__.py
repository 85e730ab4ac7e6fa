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
