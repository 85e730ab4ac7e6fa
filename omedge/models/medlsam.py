"""MedLSAM (openmedlab/MedLSAM) as ONE bundle: the MedLAM localiser plus SAM/MedSAM, three
graphs with roles `localiser`, `encoder`, `decoder`, run by kinds/medlsam.py (kind
"volume-prompted") through omedge.medlsam.segment_volume.

Two files make one model (`--weights medlam.pth --sam medsam_vit_b.pth`): models.load() calls
this module's `read_weights`, which reads both, strictly, into one state_dict under
`localiser.` and `sam.` (`combine`), which `remap` accepts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from ..spec import GraphSpec, ModelSpec, TensorSpec
from . import sam as sam_family
from .checkpoint import read_checkpoint
from .medlam import FEATURES, VARIANTS, MedLAM, build_medlam, remap_medlam

PAIRS = {"official": ("official", "vit_b"), "tiny": ("tiny", "tiny")}   # variant -> (MedLAM, SAM)


class MedLSAM(nn.Module):
    def __init__(self, localiser: MedLAM, sam: nn.Module):
        super().__init__()
        self.localiser, self.sam = localiser, sam

    def forward(self, patch):
        return self.localiser(patch)

    def graph_modules(self) -> dict:
        """One module per GraphSpec role: MedLAM's patch graph, then SAM's two."""
        return {"localiser": self.localiser, **self.sam.graph_modules()}


def build(variant: str, sam=None, **opts):
    """sam: only ever a path, which read_weights consumes; here it means --random-weights with --sam."""
    if sam is not None:
        raise UsageError("--sam is read together with --weights medlam.pth; --random-weights draws both models",
                         "drop --sam, or give --weights medlam.pth --sam medsam_vit_b.pth")
    lam, sam_variant = PAIRS[variant]
    return MedLSAM(build_medlam(lam, **opts), sam_family.build(sam_variant))


def read_weights(weights, trust: bool, options: dict) -> tuple[dict, dict]:
    """models.load()'s two-file hook: (combined raw state_dict, the options left for build).
    Without --sam the file must already be combined (localiser.* + sam.*)."""
    options = dict(options)
    sam = options.pop("sam", None)
    if sam is not None:
        return combine(weights, sam, trust), options
    raw = read_checkpoint(weights, trust=trust)
    if isinstance(raw, dict) and any(str(k).startswith("localiser.") for k in raw):
        return raw, options
    remap_medlam(raw)   # a SAM file is refused by name here; a MedLAM file passes and lacks its partner
    raise UsageError(f"{Path(weights).name} is MedLAM alone: MedLSAM also needs the SAM/MedSAM ViT-B checkpoint",
                     "omedge export medlsam --weights medlam.pth --sam medsam_vit_b.pth")


def remap(raw):
    """A combined state_dict (`localiser.*` + `sam.*`, as `combine` makes it) -> ours."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"a {type(raw).__name__}, not a state_dict of MedLAM + SAM")
    sd = dict(raw)
    parts = {p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")} for p in ("localiser", "sam")}
    if not parts["localiser"] or not parts["sam"]:
        raise CheckpointError("MedLSAM needs two files: MedLAM's medlam.pth and a SAM/MedSAM ViT-B checkpoint",
                              "omedge export medlsam --weights medlam.pth --sam medsam_vit_b.pth")
    lam, opts = remap_medlam(parts["localiser"])
    sam, _ = sam_family.remap(parts["sam"])
    return {**{"localiser." + k: v for k, v in lam.items()}, **{"sam." + k: v for k, v in sam.items()}}, opts


def combine(medlam_path: str | Path, sam_path: str | Path, trust: bool = False) -> dict:
    """Both files through the safe reader; each refused by name when it is the other one."""
    lam, _ = remap_medlam(read_checkpoint(medlam_path, trust=trust))
    sam, _ = sam_family.remap(read_checkpoint(sam_path, trust=trust))
    return {**{"localiser." + k: v for k, v in lam.items()}, **{"sam." + k: v for k, v in sam.items()}}


def torch_runner(model, spec):
    """run(role, feeds) over the torch graphs, for the kind's whole-pipeline reference."""
    modules, order = model.graph_modules(), {g.role: g.inputs for g in spec.graphs}

    def run(role, feeds):
        with torch.no_grad():
            out = modules[role](*(torch.from_numpy(np.ascontiguousarray(feeds[n], np.float32)) for n in order[role]))
        return {k: v.numpy() for k, v in out.items()}
    return run


def _localiser_tensors():
    patch = TensorSpec("patch", "NCDHW", shape=(None, 1, None, None, None), dynamic={0: "batch"},
                       description="LAS, 3 mm, HU piecewise-linear [-1000,-200,200,1500] -> [0,0.2,0.8,1]")
    outs = (TensorSpec("position", "NC", shape=(None, 3), dynamic={0: "batch"}),
            *(TensorSpec(f, "NCDHW", shape=(None, None, None, None, None), dynamic={0: "batch"}) for f in FEATURES))
    return patch, outs


_PATCH, _LOCALISER_OUT = _localiser_tensors()
_SAM_IN, _SAM_OUT = sam_family._tensors()
PREPROCESS = {
    "localiser": {"orientation": "LAS", "target_spacing": [3.0, 3.0, 3.0], "resample_order": 3,
                  "hu_piecewise": {"hu": [-1000, -200, 200, 1500], "value": [0, 0.2, 0.8, 1]},
                  "patch": VARIANTS["official"]["patch"], "query_crops": 10, "crop_seed": 2023,
                  "distance_ratio_mm": [1500, 600, 600], "feature_scales": list(FEATURES), "center_patch": 8,
                  "mode": "WPL"},
    "slices": {"hu_clip": [-500, 1000], "minmax": "per volume", "raw_zero_kept": True,
               "resize": "skimage resize order 2, anti-aliased, to 1024x1024", "box_pad_px": 10,
               "mask": "nearest to the slice size"},
    "sam": dict(sam_family.PREPROCESS),
}
SPECS = [ModelSpec(
    id="medlsam", title="MedLSAM: MedLAM 3-D localiser + SAM/MedSAM, localise-then-segment CT with a support set",
    kind="volume-prompted", variants=("official", "tiny"), default_variant="official",
    inputs=(_PATCH, *_SAM_IN), outputs=(*_LOCALISER_OUT, *_SAM_OUT), primary_output="low_res_masks",
    preprocess=PREPROCESS, licence="README: CC-BY-NC 4.0; LICENSE file: Apache-2.0; SAM weights Apache-2.0",
    source="https://github.com/openmedlab/MedLSAM", build=build, remap=remap,
    graphs=(GraphSpec("localiser", ("patch",), ("position", *FEATURES)), *sam_family.GRAPHS),
    official={"repo": "openmedlab/MedLSAM", "entry": "MedLSAM_WPL_Inference.py; MedLAM/Anatomy_detection.py, "
              "Cal_support_feature.py, Predic_corner_cor.py, detection_functions.py; MedSAM/auto_pre_CT.py",
              "transform": "MedLAM: reorient LAS, resample 3 mm, HU piecewise-linear [-1000,-200,200,1500] -> "
                           "[0,0.2,0.8,1]; SAM slices: HU clip [-500,1000], per-volume min-max to 0-255, raw 0 kept "
                           "0, skimage resize order 2 anti-aliased to 1024, SAM mean/std"})]
