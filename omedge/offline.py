"""Offline guarantees, applied where omedge calls a library, never at `import omedge`.

What phones home, as measured (strace, HOME/TMPDIR in temp folders):
- onnxruntime: its native library starts a OneDS telemetry client while `import onnxruntime`
  runs. It writes `~/.cache/Microsoft/DeveloperTools/.onnxruntime/` and `$TMPDIR/.ses`
  at once, and looks up its collector about 10 s later, then again every few seconds.
  Only ORT_DISABLE_TELEMETRY=1 in the environment *before* that import stops it;
  `disable_telemetry_events()` afterwards stops neither the files nor the lookups.
- openvino: `import openvino` imports its converter, whose `openvino_telemetry` writes
  `~/intel/openvino_ga_cid` and `~/intel/stats` and sends an event; converting and NNCF
  send more.

So `quiet_onnxruntime()` / `quiet_openvino()` run right before omedge imports the library
(backend modules, device probes) and `build_side()` before an export. When the caller
imported the library first, what its import already did cannot be undone: for OpenVINO
and NNCF the telemetry is declined for the rest of the process (what a consent file of
"0" does, without writing one); for onnxruntime, events of omedge's sessions are turned
off but the client the caller's import started keeps running (set ORT_DISABLE_TELEMETRY=1
before importing onnxruntime, or import omedge's backend first).
"""
from __future__ import annotations

import os
import sys


def quiet_onnxruntime() -> None:
    """Call before `import onnxruntime`."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()


def quiet_openvino() -> None:
    """Call before `import openvino` / `import nncf`. Not imported yet: block the telemetry
    package (openvino's converter and NNCF fall back to their no-op stubs without it).
    Already imported: decline consent in its own checker and in the live instance."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None
        return
    if sys.modules["openvino_telemetry"] is None:
        return
    _decline_openvino_telemetry()


def _decline_openvino_telemetry() -> None:
    from openvino_telemetry import Telemetry
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    def declined(self, *args, **kwargs):  # what the checker answers for a consent file of "0"
        return ConsentCheckResult.DECLINED

    OptInChecker.check = declined  # every later (re)initialisation: no consent, no client-id file
    instance = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
    if instance is not None:  # the one the caller's import created: send_event etc. check `consent`
        instance.consent = False


def build_side() -> None:
    """Before an export: no telemetry from onnxruntime, OpenVINO or NNCF; Hugging Face
    libraries local-only."""
    quiet_onnxruntime()
    quiet_openvino()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
