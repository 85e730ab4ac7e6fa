"""One module per input kind; this registry is the only list of them.

Adding a kind = one module with a `KIND` object (a `kinds.base.Kind`) + one line here.
"""
from __future__ import annotations

import importlib

from ..errors import UsageError

KINDS = {
    "image": "omedge.kinds.image",
    "video": "omedge.kinds.video",
    "volume": "omedge.kinds.volume",
    "sequence": "omedge.kinds.sequence",
    "text-generation": "omedge.kinds.text_generation",
    "promptable-segmentation": "omedge.kinds.promptable",
    "volume-prompted": "omedge.kinds.medlsam",
    "prompted-classification": "omedge.kinds.prompted",
    "grounded-detection": "omedge.kinds.detection",
}


def get_kind(name: str):
    if name not in KINDS:
        raise UsageError(f"unknown model kind '{name}'", f"this omedge knows {', '.join(KINDS)}")
    return importlib.import_module(KINDS[name]).KIND


def all_kinds() -> list:
    return [get_kind(k) for k in KINDS]
