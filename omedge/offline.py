"""Offline guarantees, applied where omedge calls a library, never at `import omedge`.

OpenVINO's converter and NNCF send usage telemetry unless opted out; Hugging Face
libraries may reach their hub. `build_side()` is called by the exporters before they
import those libraries: it blocks the telemetry package (both libraries fall back to
a no-op stub without it) and makes Hugging Face local-only.
"""
from __future__ import annotations

import os
import sys

_done = False


def build_side() -> None:
    global _done
    if _done:
        return
    sys.modules.setdefault("openvino_telemetry", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _done = True
