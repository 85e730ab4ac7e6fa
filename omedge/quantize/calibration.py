"""Calibration and verification inputs, preprocessed exactly as the runtime does."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..io.images import list_images
from ..runtime.preprocess import clip_from_frames, preprocess_frame, preprocess_one


def synthetic_images(n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """Smooth random colour fields (not noise): 16x16 random RGB upsampled bicubically.
    Only used when the user asks for synthetic data; the manifest says so."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                       .resize((size, size), Image.BICUBIC)) for _ in range(n)]


def volume_patches(volumes, pre: dict, n: int, seed: int) -> np.ndarray:
    """n network-space patches (1, D, H, W) cut at random places from volumes, after
    the same resampling and normalisation as inference."""
    from ..runtime.volume import to_model_space
    rng = np.random.default_rng(seed)
    patch = tuple(pre["patch_size"])
    spaces = [to_model_space(v, pre)[0] for v in volumes]
    out = []
    for i in range(n):
        x = spaces[i % len(spaces)]
        x = np.pad(x, [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, x.shape[1:])])
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(x.shape[1:], patch)]
        out.append(x[:, start[0]:start[0] + patch[0], start[1]:start[1] + patch[1], start[2]:start[2] + patch[2]])
    return np.stack(out)


def synthetic_inputs(n: int, seed: int, pre: dict) -> np.ndarray:
    """n preprocessed synthetic inputs: images, clips of distinct frames, or CT patches."""
    if pre.get("kind") == "volume":
        from ..runtime.volume import synthetic_ct
        return volume_patches([synthetic_ct(seed=seed + i) for i in range(min(n, 3))], pre, n, seed)
    if pre.get("kind") != "video":
        return np.stack([preprocess_one(im, pre) for im in synthetic_images(n, seed)])
    frames = synthetic_images(n * pre["frames"], seed, size=256)
    return np.stack([clip_from_frames([preprocess_frame(f, pre) for f in frames[i::n]], pre["frames"])
                     for i in range(n)])


def video_clips(folder, pre: dict, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Clips for calibration / verification: the first clip of each video in `folder`
    (and of each sub-folder of frames), sampled at the model's rate."""
    from pathlib import Path

    from ..io.video import VIDEO_SUFFIXES
    from ..runtime.stream import TimeSampler
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"clip folder not found: {folder}")
    sources = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES or p.is_dir())
    if not sources:
        raise InputError(f"no videos or frame folders in {folder}", f"expected {', '.join(sorted(VIDEO_SUFFIXES))}")
    from ..io.video import iter_frames
    clips, names = [], []
    for src in sources[:limit] if limit else sources:
        sampler, frames = TimeSampler(pre["sample_rate"] / pre["fps"]), []
        try:
            for t, frame in iter_frames(src):
                if sampler.take(t):
                    frames.append(preprocess_frame(frame, pre))
                if len(frames) == pre["frames"]:
                    break
        except InputError as e:
            raise InputError(f"calibration clip {src} cannot be used: {e.message}", e.hint) from e
        clips.append(clip_from_frames(frames, pre["frames"]))
        names.append(str(src))
    return np.stack(clips), names


def folder_volumes(folder, pre: dict, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """One patch per volume (NIfTI files or DICOM series sub-folders) in `folder`."""
    from pathlib import Path

    from ..io.volume import read_volume
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"volume folder not found: {folder}")
    sources = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")) or p.is_dir())
    if not sources:
        raise InputError(f"no NIfTI volumes or DICOM series folders in {folder}")
    sources = sources[:limit] if limit else sources
    volumes = []
    for src in sources:
        try:
            volumes.append(read_volume(src))
        except InputError as e:
            raise InputError(f"calibration volume {src} cannot be used: {e.message}", e.hint) from e
    return volume_patches(volumes, pre, len(volumes), 0), [str(s) for s in sources]


def folder_inputs(folder, preprocess_spec: dict, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    if preprocess_spec.get("kind") == "video":
        return video_clips(folder, preprocess_spec, limit)
    if preprocess_spec.get("kind") == "volume":
        return folder_volumes(folder, preprocess_spec, limit)
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
