"""Whole slide -> one embedding per tissue tile, in the HDF5 layout CLAM/TRIDENT write and
their downstream MIL code reads: `features` [N, D] float32 and `coords` [N, 2] (level-0 x, y).

    p = omedge.load("brow-int8.omedge")
    summary = omedge.wsi.embed_slide(p, "slide.svs", mpp=0.5, tile=224, out="slide_features.h5")

Tiles are read (and preprocessed) by a thread pool a bounded number ahead of the backend,
so memory stays flat over a slide of any size. Results go to a hidden `.NAME.partial` file
beside the target, flushed after every batch with a `done` counter: an interrupted run,
rerun with the same bundle and options, resumes where it stopped; anything else refuses to
mix. The finished file is renamed into place. A tile that cannot be decoded is skipped and
counted (`skipped_tiles`, `skipped_coords`), never filled with made-up pixels."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import UsageError
from .io.wsi import (
    LevelPlan,
    Slide,
    TissueParams,
    low_res,
    open_slide,
    plan_level,
    tile_grid,
    tissue_mask,
)

FORMAT = "omedge-wsi-features/1"
log = logging.getLogger("omedge.wsi")


def embed_slide(predictor, slide, mpp: float = 0.5, tile: int = 224, out=None, *, mpp_base: float | None = None,
                mpp_nearest: bool = False, min_tissue: float = 0.5, batch_size: int = 32, workers: int = 4,
                overwrite: bool = False, thumbnail=None, heatmap: str | None = None, progress=None,
                tissue: TissueParams | None = None, limit: int | None = None) -> dict:
    """Embed every tissue tile of `slide` with an image-kind predictor into `out` (.h5;
    default `<slide>_features.h5` beside it). progress(done, total, tiles_per_s) is called
    after each batch; an exception it raises stops the run, leaving a resumable file.
    `limit` embeds only the first N tissue tiles (benchmarks). Returns a summary dict."""
    s = slide if isinstance(slide, Slide) else open_slide(slide)
    try:
        return _embed_slide(predictor, s, mpp, tile, out, mpp_base, mpp_nearest, min_tissue, batch_size, workers,
                            overwrite, thumbnail, heatmap, progress, tissue or TissueParams(), limit)
    finally:
        if s is not slide:
            s.close()


def _embed_slide(predictor, s, mpp, tile, out, mpp_base, mpp_nearest, min_tissue, batch_size, workers, overwrite,
                 thumbnail, heatmap, progress, tissue, limit) -> dict:
    t0 = time.perf_counter()
    out = Path(out) if out else s.path.parent / f"{s.path.stem if s.path.is_file() else s.path.name}_features.h5"
    check_output(out, overwrite)
    if thumbnail:
        check_picture(Path(thumbnail), overwrite)   # before the work, not after it
    if heatmap and not (predictor.labels and "logits" in [o["name"] for o in predictor.manifest.outputs]):
        raise UsageError("--heatmap needs a classifier bundle (logits and label names)",
                         "this bundle gives embeddings only; leave --heatmap out")
    plan = plan_level(s, mpp, tile, mpp_base, mpp_nearest)
    if plan.resolution == "nearest":
        log.warning("%s: %s", s.path.name, plan.note)
    picture, scale = low_res(s)
    mask = tissue_mask(picture, scale * plan.mpp_base, tissue)
    coords, _ = tile_grid(mask, scale, s.dims, plan.patch_level0, min_tissue)
    coords = coords[:limit] if limit else coords
    identity = run_identity(predictor, s, plan, coords, min_tissue, tissue)
    attrs = {**{f"plan_{k}": v for k, v in plan.attrs().items()}, "mpp": plan.mpp, "tile_size": tile,
             "level": plan.level, "downsample": plan.downsample, "patch_size_level0": plan.patch_level0,
             "resolution": plan.resolution, "resolution_note": plan.note, "tissue_fraction": float(mask.mean()),
             "tiles_planned": len(coords), "min_tissue_fraction": min_tissue, **identity}
    store = FeatureStore(out, identity, attrs, overwrite)
    resumed = store.done
    try:
        skipped = _embed(predictor, s, plan, coords, store, batch_size, workers, progress)
        store.finish()
    finally:
        store.close()
    seconds = time.perf_counter() - t0
    summary = {"input": str(s.path), "output": str(out), "tiles": store.rows, "tiles_planned": len(coords),
               "skipped": store.skipped, "skipped_this_run": skipped, "resumed_from": resumed,
               "tissue_fraction": round(float(mask.mean()), 4), "level": plan.level, "mpp": round(plan.mpp, 5),
               "resolution": plan.resolution, "note": plan.note, "seconds": round(seconds, 2),
               "message": "no tissue found: the output holds no tiles" if not len(coords) else ""}
    if thumbnail:
        write_thumbnail(thumbnail, picture, mask, scale, out, plan.patch_level0, heatmap, predictor.labels, overwrite)
        summary["thumbnail"] = str(thumbnail)
    return summary


def run_identity(predictor, s: Slide, plan: LevelPlan, coords, min_tissue, tissue) -> dict:
    """What must match for a partial file to be resumed: the bundle (its manifest hash) and
    artifact, the slide, the level plan, the tissue settings and the tile list itself."""
    from . import __version__
    from .manifest import stored_hash
    st = s.path.stat()
    return {"format": FORMAT, "manifest_hash": stored_hash(predictor.path), "model_id": predictor.manifest.model["id"],
            "model_variant": predictor.manifest.model["variant"], "artifact": predictor.artifact.name,
            "backend": predictor.describe().get("backend", ""), "tool_version": f"omedge {__version__}",
            "slide": s.path.name, "slide_bytes": int(st.st_size) if s.path.is_file() else 0,
            "slide_dimensions": list(s.dims), "mpp_requested": plan.mpp_requested,
            "tissue_params": json.dumps({**asdict(tissue), "min_tissue_fraction": min_tissue}),
            "coords_sha256": hashlib.sha256(np.ascontiguousarray(coords, np.int64).tobytes()).hexdigest()}


def read_tile(s: Slide, plan: LevelPlan, x: int, y: int, pre: dict) -> np.ndarray:
    """One tile as the model sees it (CHW float32): read at the plan's level, resized to
    the tile size when the level is finer, then the manifest's preprocessing."""
    from .runtime.preprocess import preprocess_one
    try:
        px = s.read(x, y, plan.level, plan.read_size, plan.read_size)
    except Exception as e:  # noqa: BLE001 - a damaged tile raises the codec's own error type, whatever it is
        raise TileError(f"tile at ({x}, {y}): {type(e).__name__}: {str(e)[:100]}") from None
    if plan.read_size != plan.tile:
        px = shrink(px, plan.tile)
    return preprocess_one(np.ascontiguousarray(px), pre)


def shrink(px: np.ndarray, size: int) -> np.ndarray:
    """A tile read at a finer level, to size x size px: a box average when the factor is whole
    (as pyramid levels are made; Pillow's reduce, 4x faster than a resize), else Pillow's
    antialiased bilinear resize."""
    from PIL import Image
    img = Image.fromarray(np.ascontiguousarray(px))
    factor = px.shape[0] // size
    if factor * size == px.shape[0] == px.shape[1]:
        return np.asarray(img.reduce(factor))
    return np.asarray(img.resize((size, size), Image.BILINEAR))


class TileError(Exception):
    pass


def _embed(predictor, s, plan, coords, store, batch_size, workers, progress) -> int:
    """Run the not-yet-done tiles through the backend; returns the tiles skipped."""
    pre, primary = predictor.manifest.preprocess, predictor.manifest.primary_output
    start, skipped, t0 = store.done, 0, time.perf_counter()
    for end, ok, batch, bad in tile_batches(s, plan, coords, start, batch_size, workers, pre):
        outputs = predictor.run(np.stack(batch), batch_size=batch_size) if batch else {}
        extra = {k: v for k, v in outputs.items() if k == "logits" and k != primary}
        store.append(end, outputs.get(primary), coords[ok], coords[bad], extra)
        skipped += len(bad)
        for i in bad:
            log.warning("%s: skipped an undecodable tile at level-0 (%d, %d)", s.path.name, *coords[i])
        if progress:
            progress(end, len(coords), (end - start) / max(time.perf_counter() - t0, 1e-9))
    return skipped


def tile_batches(s, plan, coords, start, batch_size, workers, pre):
    """(tiles done after this batch, indexes embedded, CHW arrays, indexes skipped), in order.
    At most two batches of tiles are in flight, so memory does not grow with the slide."""
    todo = iter(range(start, len(coords)))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="omedge-wsi") as pool:
        pending: deque = deque()

        def submit():
            i = next(todo, None)
            if i is not None:
                pending.append((i, pool.submit(read_tile, s, plan, int(coords[i, 0]), int(coords[i, 1]), pre)))
        for _ in range(2 * batch_size):
            submit()
        ok, batch, bad = [], [], []
        while pending:
            i, future = pending.popleft()
            submit()
            try:
                batch.append(future.result())
                ok.append(i)
            except TileError:
                bad.append(i)
            if len(ok) + len(bad) == batch_size or not pending:
                yield i + 1, ok, batch, bad
                ok, batch, bad = [], [], []


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an unusable target before any work: not .h5, a folder, or an existing file."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise UsageError(f"{path}: slide features are written as HDF5", "give a name ending in .h5")
    if path.is_dir():
        raise UsageError(f"{path} is a folder", "give a file name ending in .h5")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UsageError(f"{path} already exists", "pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: {path.parent} is not a folder", "choose another -o location")


def _need_h5py():
    try:
        import h5py
    except ImportError:
        raise UsageError("writing slide features needs h5py", 'pip install "omedge[wsi]"') from None
    return h5py


class FeatureStore:
    """The partial HDF5 file: resizable, chunked datasets, and attributes `done` (tiles of
    the plan processed), `rows` (tiles written) and `skipped_tiles`, updated together after
    each batch and flushed. Reopened (and its identity checked) when a run resumes."""

    def __init__(self, final: Path, identity: dict, attrs: dict, overwrite: bool):
        h5py = _need_h5py()
        self.final, self.partial = final, final.with_name(f".{final.name}.partial")
        if self.partial.is_symlink():
            raise UsageError(f"{self.partial} is a symbolic link", "remove it, then run again")
        self.file = self._reopen(h5py, identity, overwrite) if self.partial.exists() else None
        if self.file is None:
            self.file = h5py.File(self.partial, "w-")   # exclusive create: nothing planted there is opened
            self.file.attrs.update({**attrs, "done": 0, "rows": 0, "skipped_tiles": 0, "complete": False})
            for name in ("coords", "skipped_coords"):
                self.file.create_dataset(name, (0, 2), np.int64, maxshape=(None, 2), chunks=(1024, 2))
        for name in self.file:   # drop rows written after the last counted batch
            self.file[name].resize(self.skipped if name == "skipped_coords" else self.rows, axis=0)

    def _reopen(self, h5py, identity: dict, overwrite: bool):
        try:
            f = h5py.File(self.partial, "r+")
        except OSError as e:   # killed while writing: the file is unreadable; start afresh
            log.warning("%s cannot be resumed (%s); starting again", self.partial.name, e)
            self.partial.unlink()
            return None
        differ = [k for k, v in identity.items() if _plain(f.attrs.get(k)) != _plain(v)]
        if not differ:
            return f
        f.close()
        if overwrite:
            self.partial.unlink()
            return None
        raise UsageError(f"{self.partial} holds a partial result of another run (different "
                         f"{', '.join(differ[:4])}); its features would be mixed with these",
                         "rerun with the same bundle and options to resume it, or pass --overwrite to start afresh")

    def _count(self, key: str) -> int:
        if self.file.id.valid:
            self._last = {k: int(self.file.attrs[k]) for k in ("done", "rows", "skipped_tiles")}
        return self._last[key]

    done = property(lambda self: self._count("done"))
    rows = property(lambda self: self._count("rows"))
    skipped = property(lambda self: self._count("skipped_tiles"))

    def append(self, done: int, features, coords, skipped_coords, extra: dict) -> None:
        f, rows = self.file, self.rows
        arrays = {"coords": coords} | ({"features": features} if features is not None else {}) | extra
        for name, value in arrays.items():
            value = np.asarray(value, np.int64 if name == "coords" else np.float32)
            if name not in f:
                f.create_dataset(name, (rows, *value.shape[1:]), np.float32, maxshape=(None, *value.shape[1:]),
                                 chunks=(256, *value.shape[1:]))
            f[name].resize(rows + len(value), axis=0)
            f[name][rows:] = value
        if len(skipped_coords):
            k = f["skipped_coords"].shape[0]
            f["skipped_coords"].resize(k + len(skipped_coords), axis=0)
            f["skipped_coords"][k:] = skipped_coords
        f.attrs.update({"rows": rows + len(coords), "done": done, "skipped_tiles": f["skipped_coords"].shape[0]})
        f.flush()

    def finish(self) -> None:
        """Mark complete, close, and rename into place (fsynced first)."""
        f, _ = self.file, self.done   # counters kept for the summary after close
        if "features" not in f:
            f.create_dataset("features", (0, 0), np.float32, maxshape=(None, None), chunks=(256, 1))
        for key in ("patch_size", "patch_level", "patch_size_level0", "downsample"):  # where CLAM/TRIDENT read them
            f["coords"].attrs[key] = f.attrs["tile_size" if key == "patch_size" else
                                             "level" if key == "patch_level" else key]
        f.attrs["complete"] = True
        f.close()
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.partial, self.final)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _plain(v):
    """HDF5 attribute values read back as numpy types: compare them as plain Python."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return list(v) if isinstance(v, tuple) else v


# -- the thumbnail: tissue tint and outline, tile grid, optional per-tile score heatmap ----------
TINT, OUTLINE, GRID, SKIPPED = (0, 170, 60), (0, 90, 30), (30, 60, 255), (255, 0, 255)


def write_thumbnail(path, picture, mask, scale, features_h5, patch0, heatmap, labels, overwrite) -> None:
    """A PNG of the low-resolution slide: tissue tinted green with a dark outline, the tiles
    written as a blue grid, skipped tiles in magenta; with `heatmap` (a class name, or "top":
    the class most probable over the slide) each tile is filled by that class's probability,
    blue (0) to red (1). Drawn from the finished HDF5, so resumed runs show every tile."""
    from PIL import Image, ImageDraw

    from .runtime.predictor import softmax
    path = check_picture(Path(path), overwrite)
    with _need_h5py().File(features_h5, "r") as f:
        coords, bad = f["coords"][:], f["skipped_coords"][:]
        logits = f["logits"][:] if "logits" in f else (f["features"][:] if heatmap and labels else None)
    rgb = picture.astype(np.float32)
    rgb[mask] = rgb[mask] * 0.65 + np.array(TINT, np.float32) * 0.35
    from scipy import ndimage
    rgb[mask & ~ndimage.binary_erosion(mask)] = OUTLINE
    img = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(img, "RGBA")
    boxes = [(x / scale, y / scale, (x + patch0) / scale - 1, (y + patch0) / scale - 1) for x, y in coords]
    if heatmap and logits is not None and len(coords):
        prob = softmax(logits.astype(np.float64))
        cls = int(prob.mean(0).argmax()) if heatmap == "top" else _class_index(heatmap, labels)
        for box, p in zip(boxes, prob[:, cls]):
            draw.rectangle(box, fill=(int(255 * p), 0, int(255 * (1 - p)), 150))
    for box in boxes:
        draw.rectangle(box, outline=GRID)
    for x, y in bad:
        draw.rectangle((x / scale, y / scale, (x + patch0) / scale - 1, (y + patch0) / scale - 1), outline=SKIPPED)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def check_picture(path: Path, overwrite: bool) -> Path:
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the thumbnail is written as PNG", "give a name ending in .png")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists", "pass --overwrite to replace it")
    return path


def _class_index(name: str, labels) -> int:
    if name not in labels:
        raise UsageError(f"--heatmap {name}: the bundle has no such class", f"choose one of {', '.join(labels)} or top")
    return list(labels).index(name)


# -- the CLI: `omedge predict BUNDLE SLIDE --wsi ...` (wired in by kinds.image) ----------------------
def cli_run(p, args, ui) -> int:
    """Each slide -> its HDF5 (and thumbnail), with a progress bar in tiles/s."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    if len(args.inputs) > 1 and (args.output or args.thumbnail):
        raise UsageError("-o / --thumbnail name one file; give one slide at a time, or omit them")
    if not args.inputs:
        raise UsageError("give a slide file")
    results = []
    for src in args.inputs:
        with Progress(TextColumn(f"{Path(src).name}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:.1f} tiles/s"), TimeRemainingColumn(),
                      console=ui.err, transient=True) as bar:
            task = bar.add_task("tiles", total=None, rate=0.0)
            r = embed_slide(p, src, mpp=args.mpp, tile=args.tile, out=args.output, mpp_base=args.mpp_base,
                            mpp_nearest=args.mpp_nearest, min_tissue=args.min_tissue,
                            batch_size=args.batch_size or 32, workers=args.workers, overwrite=args.overwrite,
                            thumbnail=args.thumbnail, heatmap=args.heatmap,
                            progress=lambda d, t, rate, bar=bar, task=task: bar.update(task, completed=d, total=t, rate=rate))
        results.append(r)
    if args.json:
        print(json.dumps({"runtime": p.describe(), "results": results}, indent=2))
        return 0
    ui.runtime_line(p)
    for r in results:
        if r["resolution"] != "exact":
            ui.err.print(f"[yellow]note[/yellow]: {r['note']}")
        if r["message"]:
            ui.err.print(f"[bold yellow]{r['input']}: {r['message']}[/bold yellow]")
        ui.out.print(f"{r['input']} -> {r['output']}: {r['tiles']} tiles ({r['skipped']} skipped, undecodable), "
                     f"tissue {100 * r['tissue_fraction']:.1f}% of the slide, level {r['level']} at "
                     f"{r['mpp']:.3g} µm/px, {r['seconds']:.1f} s" + (f", resumed at tile {r['resumed_from']}"
                                                                       if r["resumed_from"] else ""))
    return 0
