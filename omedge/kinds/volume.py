"""Volume kind: CT/MR in (NIfTI, DICOM series), a label map on the input grid out
(STU-Net, MIS-FM). Gated on the logits of patches (cosine per window) and on
whole-volume Dice over the decisive voxels: those whose reference top-1 / top-2 margin
is clear (parity.DECISIVE_MARGIN). A random or weakly trained many-class head makes most
voxels near-ties that float rounding flips; the all-voxel Dice is reported beside it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ..errors import InputError, UsageError
from ..parity import (
    decisive_share,
    decisive_threshold,
    dice_scores,
    gates_for,
    logit_scale,
    top2_margin,
)
from ..runtime.predictor import Predictor
from .base import Kind, paths_in

DICE_GATES = {"fp32": 0.99, "fp16": 0.99, "bf16": 0.99, "int8": 0.95}


class VolumePredictor(Predictor):
    def backend_options(self, art, name: str, threads, mode) -> dict:
        own = KIND.runner_options_for(self.manifest.preprocess)
        return {**super().backend_options(art, name, threads, mode), **own}

    def segment(self, volume, tta: bool = False, batch_size: int = 1, progress=None, accumulator: str = "auto"):
        """A CT/MR volume (NIfTI path, DICOM series folder or io.volume.Volume) -> label
        map on the input's grid (NIfTI voxel order) and the Volume it belongs to. One
        window per run by default: a second 128^3 window of 105 classes costs ~3 GB
        (the backend's buffers, its output and the copy) for about the same speed on a CPU.
        accumulator: the class scores' dtype, "auto" (float16 only where float32 would not
        fit, runtime.volume.choose_accumulator), "float32" or "float16"; the choice and its
        reason are in `last_segment`."""
        from ..io.volume import Volume, read_volume
        from ..runtime.volume import segment
        vol = volume if isinstance(volume, Volume) else read_volume(volume)
        self.last_segment = {}
        labels = segment(vol, lambda b: self.run(b, batch_size=batch_size)["logits"], self.manifest.preprocess,
                         batch_size=batch_size, mirror=tta, progress=progress, accumulator=accumulator,
                         classes=len(self.labels) if self.labels else None, report=self.last_segment)
        return labels, vol

    def write_dicom_seg(self, labels, vol, path, overwrite: bool = False):
        """A DICOM Segmentation of `labels` referencing vol's source series, its segments
        named from the bundle's labels and identified by model id and manifest hash."""
        from ..io.dicom_seg import write_dicom_seg
        return write_dicom_seg(labels, vol, path, self.labels, self.algorithm_name, self.algorithm_version, overwrite)

    def write_preview(self, labels, vol, path, overwrite: bool = False):
        """A PNG of 3 orthogonal slices through the labels, overlaid in the SEG's colours."""
        from ..pictures import write_preview
        return write_preview(labels, vol, path, self.labels, overwrite)

    @property
    def algorithm_name(self) -> str:
        return f"{self.manifest.model['id']} {self.manifest.model.get('variant') or ''}".strip()

    @property
    def algorithm_version(self) -> str:
        """The manifest's hash: which bundle, to the byte, produced a result."""
        from ..manifest import stored_hash
        return stored_hash(self.path)


class VolumeKind(Kind):
    name = "volume"
    predictor = VolumePredictor
    batch_suffixes = (".nii", ".nii.gz")
    batch_folders_are_items = True   # a DICOM series
    run_extras = ("volume", "dicom")  # NIfTI / DICOM in, DICOM-SEG out
    batch_writes_files = True        # one label map per volume
    min_verify = 2        # 3-D patches are large
    max_verify = 2
    raw_input = "volume"  # OIP: a NIfTI file (.nii / .nii.gz) or a zip of one DICOM series, as BYTES
    serve_merge = False   # whole volumes differ in shape: one request, one volume
    parity_streams = True  # 105 x 128^3 float32 logits: 0.9 GB a window
    # onnxruntime's arena would keep the peak of 3-D convolutions on 128^3 windows for the session's life;
    # one OpenVINO stream in throughput mode too: 2 streams segmented a volume slower (179 s vs 155 s)
    runner_options = MappingProxyType({"memory_arena": False, "streams": 1})

    def runner_options_for(self, pre: dict) -> dict:
        """Plus the one input shape every run has (one padded window): OpenVINO compiled for
        it, not for the dynamic graph, peaked 0.45 GB lower on a 128^3 STU-Net-B window (a
        whole 160x256x256 volume: 6.2 GB, not 6.7), with the same labels."""
        fixed = {"input_shape": [1, 1, *pre["patch_size"]]} if pre.get("patch_size") else {}
        return {**self.runner_options, **fixed}

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
        """Cosine of every window's logits (the gate), with the relative error and the
        voxel agreement over all and over decisive voxels reported; window by window
        (kinds/volume_parity.py), so `candidate` may be a generator (parity_streams)."""
        from .volume_parity import window_parity
        return window_parity(reference, candidate, gate, gates_for(gate, overrides))

    def pipeline_reference(self, run_torch, pre, seed):
        """The phantom, its torch label map, and each voxel's reference top-1 / top-2
        logit margin with the logit scale it is measured against."""
        from ..runtime.volume import (
            back_to_input,
            class_argmax,
            sliding_window,
            synthetic_ct,
            to_model_space,
        )
        phantom = synthetic_ct(seed=seed + 3)
        x, _ = to_model_space(phantom, pre)
        logits = sliding_window(x, lambda b: _logits(run_torch(b)), pre["patch_size"], pre.get("step", 0.5), 2, False,
                                pre.get("gaussian_sigma_scale", 0.125))
        margin = back_to_input(top2_margin(logits), phantom)
        return {"phantom": phantom.data.astype(np.int16), "phantom_affine": phantom.affine,
                "phantom_labels": back_to_input(class_argmax(logits), phantom),
                "phantom_margin": margin.astype(np.float32), "phantom_logit_scale": np.float64(logit_scale(logits))}

    def quantization_metric(self):
        """INT8 keeps the window Dice over decisive voxels (the gate's metric)."""
        from .volume_parity import WindowDice
        return WindowDice()

    def pipeline_check(self, run, stored, pre, gate):
        from ..io.volume import Volume
        from ..parity import stored_array
        from ..runtime.volume import segment
        names = stored.files if hasattr(stored, "files") else stored
        if "phantom" not in names:
            return {}, []
        arr = (lambda k: stored_array(stored, k)) if hasattr(stored, "files") else stored.__getitem__
        phantom = Volume(np.asarray(arr("phantom"), np.float32), arr("phantom_affine"), "stored phantom")
        ref = arr("phantom_labels")
        got = segment(phantom, lambda b: _logits(run(b)), pre)
        margin = arr("phantom_margin") if "phantom_margin" in names else None
        scale = float(arr("phantom_logit_scale")) if "phantom_logit_scale" in names else None
        dice, failures = volume_gate(ref, got, margin, scale, gate)
        return {"volume_dice": dice}, failures

    # -- serving: raw volumes in, a label map on the input grid out ---------------------
    def serve_outputs(self, manifest):
        return [*super().serve_outputs(manifest), {"name": "labels", "datatype": "UINT8", "shape": [1, -1, -1, -1]},
                {"name": "affine", "datatype": "FP64", "shape": [1, 4, 4]}]

    def decode_raw(self, p, items, config):
        """The bytes are written to a private folder and read by read_volume, so the same
        header checks and voxel limits apply as to files given to predict."""
        import tempfile

        from ..io.volume import read_volume
        if len(items) != 1:
            raise InputError(f"send one volume per request, got {len(items)}")
        with tempfile.TemporaryDirectory(prefix="omedge-serve-") as tmp:
            vol = read_volume(_unpack_volume(items[0], Path(tmp), int(config.max_body_mb * 2 ** 20) * 4))
        return {"volume_data": vol.data[None], "volume_affine": vol.affine[None]}

    def decode_files(self, p, paths, config):
        from ..io.volume import read_volume
        if len(paths) != 1:
            raise InputError(f"send one volume per request, got {len(paths)}")
        vol = read_volume(paths[0])
        return {"volume_data": vol.data[None], "volume_affine": vol.affine[None]}

    def serve_run(self, p, feeds, max_batch):
        if "volume_data" not in feeds:   # preprocessed windows: the graph itself
            return super().serve_run(p, feeds, max_batch)
        from ..io.volume import Volume
        labels, vol = p.segment(Volume(feeds["volume_data"][0], feeds["volume_affine"][0], "request"))
        dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
        return {"labels": labels[None].astype(dtype), "affine": vol.affine[None].astype(np.float64)}

    def add_cli_arguments(self, parser):
        parser.add_argument("--tta", action="store_true", help="volumes: 8-way mirroring (slower, as nnU-Net)")
        parser.add_argument("--accumulator", choices=("auto", "float32", "float16"), default="auto",
                            help="volumes: dtype of the sliding window's class scores; auto (default) takes float16, "
                                 "half the memory, only where float32 would not fit in the memory available")
        parser.add_argument("--format", dest="volume_format", choices=list(OUTPUT_FORMATS),
                            help="volumes: the label map as NIfTI or as a DICOM-SEG referencing the input series "
                                 "(default: from the -o suffix, .dcm -> dicom-seg)")
        parser.add_argument("--preview", metavar="PNG",
                            help="also write a PNG to check by eye (volumes: 3 orthogonal slices with the labels "
                                 "overlaid; SAM: the image with each prompt's mask and box)")

    def cli_predict(self, p, args, ui) -> int:
        """CT/MR volumes -> label maps on the input grid (NIfTI or DICOM-SEG), with
        per-class volumes and optionally a preview picture."""
        if args.output and len(args.inputs) > 1:
            raise UsageError("-o names one label map; give one input at a time, or omit -o to write "
                             "<input>_seg.nii.gz next to each input")
        if getattr(args, "preview", None) and len(args.inputs) > 1:
            raise UsageError("--preview names one picture; give one input at a time")
        fmt = output_format(args)
        results = [_predict_volume(p, args, ui, src, fmt) for src in args.inputs]
        if args.json:
            print(json.dumps({"runtime": p.describe(), "results": results}, indent=2))
            return 0
        for r in results:
            ui.out.print(f"{r['input']} -> {r['output']} ({r['seconds']:.1f} s)"
                         + (f", preview {r['preview']}" if r.get("preview") else ""))
            ui.table("structures found", ["label", "volume ml"], sorted(r["volumes_ml"].items(), key=lambda kv: -kv[1]))
        return 0


OUTPUT_FORMATS = {"nifti": ("_seg.nii.gz", (".nii.gz", ".nii")), "dicom-seg": ("_seg.dcm", (".dcm",))}


def output_format(args) -> str:
    """--format, else from the -o suffix: .dcm is a DICOM-SEG, anything else NIfTI."""
    fmt = getattr(args, "volume_format", None)
    if fmt:
        return fmt
    return "dicom-seg" if args.output and str(args.output).endswith(".dcm") else "nifti"


def _predict_volume(p, args, ui, src, fmt: str) -> dict:
    """One volume: outputs checked and the input read (and, for a SEG, its series checked)
    before the segmentation runs, so a refusal costs seconds, not minutes."""
    from rich.progress import Progress

    from ..io.volume import check_output, read_volume, write_labels
    from ..runtime.volume import class_volumes
    suffix, suffixes = OUTPUT_FORMATS[fmt]
    if fmt == "dicom-seg" and not Path(src).is_dir():
        raise UsageError(f"{src} is not a DICOM series folder: a DICOM-SEG must reference the DICOM images it "
                         "segments", "give the series folder, or write NIfTI (-o seg.nii.gz, --format nifti)")
    name = Path(src).name.removesuffix(".gz").removesuffix(".nii")
    target = Path(args.output) if args.output else Path(src).parent / f"{name}{suffix}"
    what = "a DICOM-SEG is written as one .dcm file" if fmt == "dicom-seg" else "a label map is written as NIfTI"
    check_output(target, args.overwrite, suffixes, what)
    preview = getattr(args, "preview", None)
    if preview:
        check_output(preview, args.overwrite, (".png",), "a preview is written as PNG")
    t0 = time.perf_counter()
    vol = read_volume(src)
    if fmt == "dicom-seg":
        from ..io.dicom_seg import check_seg_source
        check_seg_source(vol)
    with Progress(console=ui.err, transient=True) as bar:
        task = bar.add_task(f"segmenting {Path(src).name}", total=None)
        labels, vol = p.segment(vol, tta=args.tta, batch_size=args.batch_size or 1,
                                progress=lambda done, total: bar.update(task, completed=done, total=total),
                                accumulator=getattr(args, "accumulator", "auto"))
    if fmt == "dicom-seg":
        p.write_dicom_seg(labels, vol, target, overwrite=args.overwrite)
    else:
        write_labels(labels, vol, target, overwrite=args.overwrite)
    if preview:
        p.write_preview(labels, vol, preview, overwrite=args.overwrite)
    return {"input": str(src), "output": str(target), "format": fmt, "preview": str(preview) if preview else None,
            "shape": list(vol.data.shape), "spacing_mm": [round(float(v), 4) for v in vol.spacing],
            "seconds": time.perf_counter() - t0, **p.last_segment, "volumes_ml": class_volumes(labels, vol, p.labels)}


def _logits(out):
    """A runner's result: the outputs by name (backends, and the exporter's torch runner),
    or the logits array itself."""
    return out["logits"] if isinstance(out, dict) else out


def volume_gate(ref, got, margin, scale, gate: str) -> tuple[dict, list[str]]:
    """Per-class Dice of the candidate's label map on the decisive voxels (the gate) and
    on all voxels. Bundles without stored margins are gated on all voxels."""
    threshold = decisive_threshold(scale, gate) if margin is not None else None
    mask = np.asarray(margin) > threshold if margin is not None else None
    decisive, every = dice_scores(ref, got, mask), dice_scores(ref, got)
    limit = DICE_GATES.get(gate, 0.95)
    gated = decisive if mask is not None else every
    worst = min(gated.values()) if gated else 1.0
    where = ", decisive voxels" if mask is not None else ""
    failures = ([f"volume Dice {worst:.4f} < {limit} (class {min(gated, key=gated.get)}{where})"]
                if worst < limit else [])
    record = {"per_class": gated, "min": worst, "classes": len(gated), "gate": limit,
              "all_voxels": {"per_class": every, "min": min(every.values()) if every else 1.0},
              "input": "synthetic CT phantom, whole-volume pipeline"}
    if mask is not None:
        record["decisive"] = {"margin_share": decisive_share(gate), "logit_scale": scale,
                              "threshold": threshold, "voxel_share": float(mask.mean()),
                              "rule": ("reference top-1 minus top-2 logit > margin_share * logit scale "
                                       "(RMS of the class scores' spread)")}
    return record, failures


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


def _unpack_volume(data: bytes, folder: Path, max_unpacked: int) -> Path:
    """NIfTI bytes -> folder/volume.nii[.gz]; a zip of a DICOM series -> folder/series/
    (member names flattened, so no path in the archive can leave the folder; the
    unpacked size is bounded, against zip bombs)."""
    import io
    import zipfile
    if data[:2] == b"\x1f\x8b":
        target = folder / "volume.nii.gz"
    elif data[:4] == b"PK\x03\x04":
        series = folder / "series"
        series.mkdir()
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                members = [m for m in z.infolist() if not m.is_dir()]
                if sum(m.file_size for m in members) > max_unpacked:
                    raise InputError(f"the DICOM zip unpacks to more than {max_unpacked >> 20} MB")
                for k, m in enumerate(members):
                    (series / f"{k:05d}.dcm").write_bytes(z.read(m))
        except zipfile.BadZipFile as e:
            raise InputError(f"the volume is not a readable zip of a DICOM series ({e})") from None
        return series
    elif len(data) >= 348 and {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")} & {348, 540}:
        target = folder / "volume.nii"
    else:
        raise InputError("the volume is neither NIfTI (.nii / .nii.gz) nor a zip of one DICOM series")
    target.write_bytes(data)
    return target

