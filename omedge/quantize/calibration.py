"""Calibration and verification inputs, preprocessed exactly as the runtime does."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..io.images import list_images
from ..runtime.preprocess import preprocess_one


def synthetic_images(n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """Smooth random colour fields (not noise): 16x16 random RGB upsampled bicubically.
    Only used when the user asks for synthetic data; the manifest says so."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                       .resize((size, size), Image.BICUBIC)) for _ in range(n)]


def folder_inputs(folder, preprocess_spec: dict, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    files = list_images(folder)
    if limit:
        step = max(1, len(files) // limit)  # spread over the folder, deterministic
        files = files[::step][:limit]
    arrays = []
    for f in files:
        try:
            arrays.append(preprocess_one(f, preprocess_spec))
        except InputError as e:
            raise InputError(f"calibration image {f} cannot be used: {e.message}",
                             e.hint or "remove or fix it, then run again") from e
    return np.stack(arrays), [str(f) for f in files]


def split_holdout(x: np.ndarray, names: list[str], holdout: int):
    """Every k-th image (at most a quarter of them) is held out for verification, the
    rest calibrates."""
    if len(x) < 2:
        raise InputError(f"need at least 2 calibration images (one is held out for verification), got {len(x)}")
    holdout = max(1, min(holdout, len(x) // 4))
    k = max(2, len(x) // holdout)
    held = np.zeros(len(x), bool)
    held[k - 1::k] = True
    held[np.flatnonzero(held)[holdout:]] = False
    return x[~held], x[held], [n for n, h in zip(names, held) if h]
