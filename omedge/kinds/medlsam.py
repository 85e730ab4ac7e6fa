"""MedLSAM bundles (kind "volume-prompted"): the MedLAM localiser, SAM/MedSAM's encoder and
decoder, three graphs in one bundle, run by omedge.medlsam.segment_volume: a query CT and a
support set of annotated CTs in, a label map on the query's grid out.

The same callables (`pipeline_callables(run, pre)`) drive the torch reference at export and
the bundle at run time, so the numpy pre/post-processing between the graphs is one code path.
The whole-pipeline check (Dice per class and boxes, bundle vs torch) runs on a synthetic
phantom with itself as the one support case. Random weights give near-flat similarity maps,
where the argmax could move with float rounding: so the check records, for torch and for the
bundle, the smallest gap between the best and second-best similarity of any extreme point
(`argmax_margin_min`; the maps sum three cosines, fp32 rounding moves them by ~1e-6) and
calls the comparison decisive only when that gap is above DECISIVE_MARGIN."""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ExportError, UsageError
from ..parity import compare
from .promptable import (GATES, Embedding, PromptableKind, PromptablePredictor, embed_with, prepare_image,
                         prompt_arrays, segment_with)

LOCALISER_OUT = ("position", "feature0", "feature1", "feature2")
PIPELINE = {"query": "medlsam_phantom.phantom(shape=(40, 40, 28), seed=0)", "support": "the query and its labels (one case)",
            "classes": [1, 2, 3], "gate": "per-class Dice >= 0.99 on all voxels, and the same boxes",
            "decisive": "argmax_margin_min (best - second-best similarity of every extreme point, torch) above "
                        "1e-5: float rounding (~1e-6) cannot swap a box edge, so a failure is a real difference"}
DICE_MIN, DECISIVE_MARGIN = 0.99, 1e-5


def pipeline_callables(run, pre: dict) -> dict:
    """segment_volume's localise / embed / segment (and its options) over run(role, feeds)."""
    sam_pre, loc = pre["sam"], pre["localiser"]
    return {"localise": lambda patches: run("localiser", {"patch": patches}),
            "embed": lambda rgb: embed_with(run, sam_pre, rgb),
            "segment": lambda emb, box: segment_with(run, sam_pre, emb, boxes=[box])[0][0],
            "patch": int(loc["patch"]), "n_crops": int(loc["query_crops"]), "seed": int(loc["crop_seed"])}


def run_pipeline(run, pre: dict, ct, support, classes=None, progress=None, margins: list | None = None):
    """segment_volume over run(role, feeds); margins: gets each extreme point's argmax gap."""
    from ..medlsam import segment_volume

    def gaps(_, maps):
        top2 = np.sort(maps.reshape(len(maps), -1), axis=1)[:, -2:]
        margins.extend((top2[:, 1] - top2[:, 0]).tolist())
    return segment_volume(ct, support, classes=classes, progress=progress, on_similarity=gaps if margins is not None
                          else None, **pipeline_callables(run, pre))


def _phantom_case():
    from ..medlsam_phantom import phantom
    vol, labels = phantom(shape=(40, 40, 28), seed=0)
    from ..io.volume import Volume
    return vol, [(vol, Volume(labels, vol.affine, "phantom labels"))]


class MedLSAMPredictor(PromptablePredictor):
    role = "localiser"

    def localise(self, patches: np.ndarray) -> dict:
        return self.run_graph("localiser", {"patch": patches})

    def embed(self, image) -> Embedding:
        """SAM's encoder once on one image (a CT slice as MedLSAM prepares it, or any picture)."""
        emb = embed_with(self.run_graph, self.manifest.preprocess["sam"], image)
        emb.artifact = self.graphs["encoder"][1].name
        return emb

    def segment(self, emb: Embedding, boxes=None, points=None, point_labels=None, multimask_output=False):
        return segment_with(self.run_graph, self.manifest.preprocess["sam"], emb, boxes, points, point_labels,
                            multimask_output)

    def segment_volume(self, ct, support, classes=None, progress=None):
        """A label map of the support set's classes on `ct`'s grid (omedge.medlsam.MedLSAMResult).
        support: a folder (NAME + NAME_label, or imagesTr/labelsTr) or [(image, label)] pairs."""
        return run_pipeline(self.run_graph, self.manifest.preprocess, ct, support, classes, progress)

    def predict(self, *args, **kwargs):
        raise UsageError("MedLSAM bundles segment volumes with a support set",
                         "p.segment_volume(ct, support='support/'); p.embed / p.segment for one 2-D slice")


class MedLSAMKind(PromptableKind):
    name = "volume-prompted"
    predictor = MedLSAMPredictor
    min_verify = 2
    max_verify = 3
    cli_predict_help = "one query CT and --support DIR"
    _export: ClassVar[dict] = {}   # model_request -> graph_feeds of one export (the hooks get no shared job)

    # -- build side ---------------------------------------------------------------
    def export_request(self, spec, preprocess, options):
        """--sam is the one export option: the second file, read by models.medlsam.read_weights."""
        rest = {k: v for k, v in options.items() if k != "sam"}
        if rest:
            raise UsageError(f"{', '.join(rest)} do not apply to {spec.id}", "medlsam takes --weights and --sam")
        if "sam" not in options:
            return preprocess, [i.to_dict() for i in spec.inputs], {}
        from ..bundle import sha256
        sam = Path(options["sam"])
        if not sam.is_file():
            raise UsageError(f"--sam {sam}: no such file", "give the SAM/MedSAM ViT-B checkpoint (.pth)")
        pre = {**preprocess, "sam_weights": {"file": sam.name, "sha256": sha256(sam)}}  # --weights is in `weights`
        return pre, [i.to_dict() for i in spec.inputs], {"sam": str(sam)}

    def model_request(self, spec, pre, model):
        """SAM's sizes from its half, MedLAM's patch from the localiser, and the torch run of
        the whole pipeline on the phantom (stored in parity.npz, re-run at verify). Build side only."""
        from ..models.medlsam import torch_runner
        sam_pre, shapes = super().model_request(spec, pre["sam"], model.sam)
        p = int(model.localiser.patch)
        pre = {**pre, "sam": sam_pre, "localiser": {**pre["localiser"], "patch": p}}
        shapes["patch"] = (None, 1, p, p, p)
        ct, support = _phantom_case()
        margins: list = []
        res = run_pipeline(torch_runner(model, spec), pre, ct, support, margins=margins)
        pre["pipeline_check"] = {**PIPELINE, "torch_boxes": {str(c): b for c, b in res.boxes.items()},
                                 "torch_voxels": {str(c): int((res.labels == c).sum()) for c in res.boxes},
                                 "torch_argmax_margin_min": float(min(margins))}
        MedLSAMKind._export = {"pre": pre, "labels": res.labels, "ct": ct}
        return pre, shapes

    def pipeline_reference(self, run_torch, pre, seed):
        """The torch label map of the phantom check (computed in model_request, which has the model)."""
        return {"pipeline_labels": MedLSAMKind._export["labels"]} if MedLSAMKind._export else {}

    def synthetic_samples(self, n, seed, pre, name="patch"):
        """HU-mapped localiser patches cropped from phantoms (seeded shifts of the organs)."""
        from ..medlsam import medlam_input
        from ..medlsam_phantom import phantom
        p, rng, out = int(pre["localiser"]["patch"]), np.random.default_rng(seed), []
        for i in range(n):
            vol, _ = phantom(shift_mm=tuple(rng.uniform(-6, 6, 3)), scale=float(rng.uniform(0.9, 1.1)), seed=seed + i)
            out.append({name: _crop(medlam_input(vol, p)[0], p, rng)})
        return out

    def folder_samples(self, source, pre, limit, name="patch"):
        """Localiser patches from a folder of CTs (NIfTI files or DICOM series folders)."""
        from ..io.volume import read_volume
        from ..medlsam import medlam_input
        from .base import paths_in
        files = paths_in(source, (".nii", ".nii.gz"), "CT")[:limit or None]
        p, rng = int(pre["localiser"]["patch"]), np.random.default_rng(0)
        return [{name: _crop(medlam_input(read_volume(f), p)[0], p, rng)} for f in files], [str(f) for f in files]

    def graph_feeds(self, role, samples, upstream, seed, purpose, model=None):
        """encoder: axial phantom slices as MedLSAM prepares them; decoder: 3 seeded boxes each.
        The first verification slice also carries the whole-pipeline reference (parity.npz)."""
        from ..medlsam import SliceImages
        job = MedLSAMKind._export
        if not job:
            raise ExportError("medlsam graph feeds asked for before the model was built")
        sam_pre, ct = job["pre"]["sam"], job["ct"]
        rng = np.random.default_rng(seed)
        if role == "encoder":
            images, depth = SliceImages(ct), ct.data.shape[2]
            ks = [int(k) for k in rng.integers(depth // 4, 3 * depth // 4, len(samples))]
            feeds = [{"pixel_values": prepare_image(images(k), sam_pre)[0]} for k in ks]
            return feeds
        if role != "decoder":
            raise ExportError(f"{self.name} has no graph '{role}'")
        s = int(sam_pre["image_size"])
        feeds = []
        for _ in samples:
            lo = rng.uniform(200, 560, (3, 2))
            boxes = np.concatenate([lo, lo + rng.uniform(80, 400, (3, 2))], 1).clip(0, 1024)
            coords, labels = prompt_arrays((1024, 1024), (s, s), boxes=boxes.tolist())
            feeds.append({"point_coords": coords, "point_labels": labels})
        return feeds

    # -- parity -------------------------------------------------------------------
    def parity(self, reference, candidate, gate, overrides, inputs):
        """Localiser: cosine of the position and of each feature map; encoder / decoder: SAM's."""
        result = {"outputs": {}, "failures": []}
        if "position" in candidate[0]:
            gates = {**GATES[gate], **(overrides or {}).get(gate, {})}
            loc = compare({k: np.concatenate([r[k] for r in reference]) for k in LOCALISER_OUT},
                          {k: np.concatenate([c[k] for c in candidate]) for k in LOCALISER_OUT},
                          {"cosine_min": gates["cosine_min"]})
            result = {**loc, "gates": gates}
        rest = [{k: v for k, v in c.items() if k not in LOCALISER_OUT} for c in candidate]
        if rest[0]:
            sam = super().parity(reference, rest, gate, overrides, inputs)
            result["outputs"].update(sam["outputs"])
            result["failures"] += sam["failures"]
            result["gates"] = {**result.get("gates", {}), **sam["gates"]}
        result["passed"] = not result["failures"]
        return result

    def pipeline_source(self, stored, inputs):
        """The phantom's reference: top level (kinds/base.py's place) or, in older bundles, sample 0."""
        return stored if "pipeline_labels" in stored.files else inputs[0]

    def pipeline_check(self, run, stored, pre, gate):
        """The phantom through the bundle's graphs vs the stored torch label map and boxes."""
        if "pipeline_labels" not in stored:
            return {}, ["parity.npz has no whole-pipeline reference (pipeline_labels)"]
        ct, support, margins = *_phantom_case(), []
        got = run_pipeline(run, pre, ct, support, margins=margins)
        ref, check = stored["pipeline_labels"], pre["pipeline_check"]
        dice = {str(c): _dice(ref == c, got.labels == c) for c in check["classes"]}
        want = check["torch_boxes"]
        boxes = {str(c): b for c, b in got.boxes.items()}
        worst = min(dice.values()) if dice else 0.0
        failures = [] if worst >= DICE_MIN else [f"MedLSAM pipeline Dice {worst:.4f} < {DICE_MIN} (per class {dice})"]
        if not ref.any():
            failures.append("the stored torch label map of the pipeline check is empty: nothing was compared")
        if boxes != want:
            failures.append(f"MedLSAM pipeline boxes {boxes} differ from torch's {want}")
        record = {"per_class": dice, "min": worst, "classes": len(dice), "gate": DICE_MIN, "boxes": boxes,
                  "boxes_equal": boxes == want, "voxels": {str(c): int((got.labels == c).sum()) for c in got.boxes},
                  "argmax_margin_min": float(min(margins)), "torch_argmax_margin_min": check["torch_argmax_margin_min"],
                  "decisive": bool(check["torch_argmax_margin_min"] > DECISIVE_MARGIN),
                  "input": PIPELINE["query"] + "; support: " + PIPELINE["support"]}
        return {"volume_dice": record}, failures

    # -- CLI ----------------------------------------------------------------------
    def add_cli_arguments(self, parser):
        parser.add_argument("--support", help="medlsam: folder of annotated CTs (NAME + NAME_label, or "
                                              "imagesTr/NAME_0000 + labelsTr/NAME)")
        parser.add_argument("--classes", help="medlsam: comma list of label values to segment (default: all shared)")

    def cli_predict(self, p, args, ui) -> int:
        return cli_predict(p, args, ui)

    def decode_request(self, predictor, tensors, config):
        raise UsageError(f"{self.name} bundles are not served over OIP (a support set per request)",
                         "use `omedge predict BUNDLE CT --support DIR` or p.segment_volume()")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks of one class; both empty agree (the record keeps the voxel counts)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _crop(img: np.ndarray, p: int, rng) -> np.ndarray:
    """A (1, 1, p, p, p) crop near the middle of a padded MedLAM input."""
    c = np.array(img.shape) // 2 + rng.integers(-4, 5, 3)
    lo = np.clip(c - p // 2, 0, np.array(img.shape) - p)
    return np.ascontiguousarray(img[lo[0]:lo[0] + p, lo[1]:lo[1] + p, lo[2]:lo[2] + p][None, None], np.float32)


def cli_predict(p, args, ui) -> int:
    """One query CT + --support DIR -> a NIfTI label map on the query's grid, volumes and boxes."""
    import time

    from rich.progress import Progress

    from ..io.volume import check_output, read_volume, write_labels
    if len(args.inputs) != 1:
        raise UsageError(f"give one query CT, got {len(args.inputs)}")
    if not args.support:
        raise UsageError("MedLSAM needs a support set: --support DIR", "a few CTs with label maps")
    src = args.inputs[0]
    name = Path(src).name.removesuffix(".gz").removesuffix(".nii")
    target = check_output(Path(args.output) if args.output else Path(src).parent / f"{name}_seg.nii.gz",
                          args.overwrite)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    t0, vol = time.perf_counter(), read_volume(src)
    with Progress(console=ui.err, transient=True) as bar:
        task = bar.add_task(f"segmenting {Path(src).name} slice by slice", total=None)
        res = p.segment_volume(vol, args.support, classes=classes,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_labels(res.labels, vol, target, overwrite=args.overwrite)
    out = {"input": str(src), "output": str(target), "shape": list(vol.data.shape), "slices": res.slices,
           "seconds": time.perf_counter() - t0, "volumes_ml": res.volumes_ml,
           "boxes": {str(c): b for c, b in res.boxes.items()}}
    if args.json:
        print(json.dumps({"runtime": p.describe(), "results": [out]}, indent=2))
        return 0
    ui.out.print(f"{src} -> {target} ({out['seconds']:.1f} s, {res.slices} slices)")
    ui.table("structures found", ["label", "volume ml"], [(k, f"{v:.2f}") for k, v in res.volumes_ml.items()])
    ui.table("boxes (query voxels, inclusive)", ["class", "from i, j, k", "to i, j, k"],
             [(c, str(b[0]), str(b[1])) for c, b in out["boxes"].items()])
    return 0


KIND = MedLSAMKind()
