"""Synthetic CTs and support sets for MedLSAM tests: a body of soft tissue and fat in air
with three ellipsoid "organs" of distinct HU, their label map, and both support layouts."""
from __future__ import annotations

import numpy as np

from omedge.medlsam_phantom import (  # noqa: F401  (re-exported for the tests)
    GREY_THRESHOLD,
    ORGANS,
    phantom,
    save,
    support_folder,
)


def threshold_sam(threshold: float = GREY_THRESHOLD):
    """A stand-in for SAM that is not MedLSAM's code: the 'embedding' is the grey slice and a
    box prompt returns the voxels of the box brighter than `threshold` (default: than soft
    tissue, i.e. the organs; 50: the whole body)."""
    def embed(rgb):
        assert rgb.shape == (1024, 1024, 3) and rgb.dtype == np.uint8
        return rgb[:, :, 0].astype(np.float32)

    def segment(emb, box):
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        mask = np.zeros(emb.shape, bool)
        mask[y0:y1 + 1, x0:x1 + 1] = emb[y0:y1 + 1, x0:x1 + 1] > threshold
        return mask
    return embed, segment


def band_localise(patches):
    """A hand-made localiser with MedLAM's outputs: position 0 (so the estimate is the crop
    centre and the feature refinement does all the work) and, as features, soft memberships
    of the phantom's HU bands, average-pooled to 1/4, 1/2 and full resolution. Random MedLAM
    weights localise nothing, so this is what shows the refinement lands on the organs."""
    from omedge.medlsam import hu_piecewise
    centres = hu_piecewise(np.array([-1000.0, -80.0, 40.0, *(hu for _, _, hu in ORGANS.values())]))
    f = np.exp(-((patches - centres[None, :, None, None, None]) / 0.03) ** 2).astype(np.float32)
    n, c, d = f.shape[:3]

    def pool(s):
        return f.reshape(n, c, d // s, s, d // s, s, d // s, s).mean((3, 5, 7))
    return {"position": np.zeros((n, 3), np.float32), "feature0": pool(4), "feature1": pool(2), "feature2": f}
