"""omedge: OpenMEDLab foundation models as verified, offline deployment bundles."""
import os
import sys

__version__ = "0.1.0"

# OpenVINO's converter and NNCF send usage telemetry unless the user opted out in a
# file under ~/intel. Both fall back to a no-op stub when the telemetry package does
# not import, so block it for this process: omedge never phones home.
sys.modules.setdefault("openvino_telemetry", None)
# Hugging Face libraries: local files only, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .errors import OmedgeError  # noqa: E402
from .runtime import load  # noqa: E402


def export(*args, **kwargs):
    """Build side (needs `omedge[export]`): see omedge.exporters.export. (The subpackage
    is not called `export` so that it cannot shadow this function.)"""
    from .exporters import export as _export
    return _export(*args, **kwargs)


__all__ = ["export", "load", "OmedgeError", "__version__"]
