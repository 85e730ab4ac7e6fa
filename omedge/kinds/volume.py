"""Volume kind: CT/MR in (NIfTI, DICOM series), a label map on the input grid out
(STU-Net, MIS-FM). Gated on the logits of patches and on whole-volume Dice."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from ..parity import compare, concat, gates_for
from ..runtime.predictor import Predictor
from .base import Kind, paths_in

DICE_GATES = {"fp32": 0.99, "fp16": 0.99, "bf16": 0.99, "int8": 0.95}


class VolumePredictor(Predictor):
    def segment(self, volume, tta: bool = False, batch_size: int = 2, progress=None):
        """A CT/MR volume (NIfTI path, DICOM series folder or io.volume.Volume) -> label
        map on the input's grid (NIfTI voxel order) and the Volume it belongs to."""
        from ..io.volume import Volume, read_volume
        from ..runtime.volume import segment
        vol = volume if isinstance(volume, Volume) else read_volume(volume)
        labels = segment(vol, lambda b: self.run(b, batch_size=batch_size)["logits"], self.manifest.preprocess,
                         batch_size=batch_size, mirror=tta, progress=progress)
        return labels, vol


class VolumeKind(Kind):
    name = "volume"
    predictor = VolumePredictor
    min_verify = 2        # 3-D patches are large
    max_verify = 2

    def checkpoint_options(self, weights):
        """nnU-Net keeps its plans beside the checkpoint as `<file>.pkl`."""
        from pathlib import Path
        plans = Path(str(weights) + ".pkl") if weights is not None else None
        return {"plans": plans} if plans is not None and plans.is_file() else {}

    def export_request(self, spec, preprocess, options):
        """plans: an nnU-Net plans file beside the checkpoint gives the preprocessing."""
        options = dict(options)
        plans = options.pop("plans", None)
        preprocess, inputs, build = super().export_request(spec, preprocess, options)
        if plans is not None:
            from ..models.nnunet_plans import preprocess_from_plans, read_plans
            preprocess = {**preprocess, **preprocess_from_plans(read_plans(plans))}
        return preprocess, inputs, build

    def folder_samples(self, source, pre, limit, name="volume"):
        """One patch per volume (NIfTI files or DICOM series sub-folders) in `source`."""
        from ..io.volume import read_volume
        sources = paths_in(source, (".nii", ".nii.gz"), "NIfTI volume or DICOM series")[:limit or None]
        volumes = []
        for src in sources:
            try:
                volumes.append(read_volume(src))
            except InputError as e:
                raise InputError(f"calibration volume {src} cannot be used: {e.message}", e.hint) from e
        return [{name: p[None]} for p in volume_patches(volumes, pre, len(volumes), 0)], [str(s) for s in sources]

    def synthetic_samples(self, n, seed, pre, name="volume"):
        from ..runtime.volume import synthetic_ct
        vols = [synthetic_ct(seed=seed + i) for i in range(min(n, 3))]
        return [{name: p[None]} for p in volume_patches(vols, pre, n, seed)]

    def parity(self, reference, candidate, gate, overrides, inputs):
        ref, got = concat(reference), concat(candidate)
        result = compare(ref, got, gates_for(gate, overrides))
        for name in ref:
            if name in result["outputs"] and ref[name].ndim > 2:  # the gate is the Dice below
                result["outputs"][name]["voxel_agreement"] = float((ref[name].argmax(1) == got[name].argmax(1)).mean())
        return result

    def pipeline_reference(self, run_torch, pre, seed):
        from ..runtime.volume import segment, synthetic_ct
        phantom = synthetic_ct(seed=seed + 3)
        return {"phantom": phantom.data.astype(np.int16), "phantom_affine": phantom.affine,
                "phantom_labels": segment(phantom, run_torch, pre)}

    def pipeline_check(self, run, stored, pre, gate):
        from ..io.volume import Volume
        from ..runtime.volume import volume_dice
        if "phantom" not in (stored.files if hasattr(stored, "files") else stored):
            return {}, []
        phantom = Volume(np.asarray(stored["phantom"], np.float32), stored["phantom_affine"], "stored phantom")
        dice, failures = volume_dice(lambda b: run(b)["logits"], phantom, stored["phantom_labels"], pre,
                                     DICE_GATES.get(gate, 0.95))
        return {"volume_dice": dice}, failures

    def add_cli_arguments(self, parser):
        parser.add_argument("--tta", action="store_true", help="volumes: 8-way mirroring (slower, as nnU-Net)")

    def cli_predict(self, p, args, ui) -> int:
        """CT/MR volumes -> NIfTI label maps on the input grid, with per-class volumes."""
        from rich.progress import Progress

        from ..io.volume import write_labels
        from ..runtime.volume import class_volumes
        if args.output and len(args.inputs) > 1:
            raise UsageError("-o names one label map; give one input at a time, or omit -o to write "
                             "<input>_seg.nii.gz next to each input")
        results = []
        for src in args.inputs:
            name = Path(src).name.removesuffix(".gz").removesuffix(".nii")
            target = Path(args.output) if args.output else Path(src).parent / f"{name}_seg.nii.gz"
            if target.exists() and not args.overwrite:
                raise UsageError(f"{target} already exists", "pass --overwrite to replace it")
            t0 = time.perf_counter()
            with Progress(console=ui.err, transient=True) as bar:
                task = bar.add_task(f"segmenting {Path(src).name}", total=None)
                labels, vol = p.segment(src, tta=args.tta, batch_size=args.batch_size or 2,
                                        progress=lambda done, total: bar.update(task, completed=done, total=total))
            write_labels(labels, vol, target, overwrite=args.overwrite)
            results.append({"input": src, "output": str(target), "shape": list(vol.data.shape),
                            "spacing_mm": [round(float(v), 4) for v in vol.spacing],
                            "seconds": time.perf_counter() - t0, "volumes_ml": class_volumes(labels, vol, p.labels)})
        if args.json:
            print(json.dumps({"runtime": p.describe(), "results": results}, indent=2))
            return 0
        for r in results:
            ui.out.print(f"{r['input']} -> {r['output']} ({r['seconds']:.1f} s)")
            ui.table("structures found", ["label", "volume ml"], sorted(r["volumes_ml"].items(), key=lambda kv: -kv[1]))
        return 0


def volume_patches(volumes, pre: dict, n: int, seed: int) -> list[np.ndarray]:
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
    return out


KIND = VolumeKind()
