"""Pictures to check a result by eye, Pillow + numpy only (the run side has no matplotlib).

`label_colours` is the one palette: the volume preview, the DICOM-SEG's recommended
display colours and later mask overlays all use it, so a structure has the same colour
in the PNG as in the viewer that opens the SEG. Colours are keyed by the model's class
id, not by the order of what was found, so "liver" looks the same in every case."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

# Well separated, readable on grey CT: class 1, 2, ... (0 is background and never drawn).
BASE_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
                (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128)]
CT_WINDOW = (-160.0, 240.0)   # soft-tissue window (W 400, L 40) in HU
PANEL_PX = 320                # the largest extent of the volume, in pixels, on every panel
ALPHA = 0.5
LEGEND_COLUMN, LEGEND_ROW = 200, 22   # px per legend entry: many-class models wrap into columns


def label_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB, row = class id; row 0 (background) black. Past the table,
    hues step by the golden angle so neighbouring ids stay apart."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(1, n):
        if i <= len(BASE_COLOURS):
            out[i] = BASE_COLOURS[i - 1]
        else:
            h = (i * 0.381966) % 1.0
            out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, 0.75, 0.95)) * 255)
    return out


def intensity_window(data: np.ndarray) -> tuple[float, float]:
    """A CT soft-tissue window when the values are Hounsfield units (air near -1000),
    else the 0.5-99.5 percentiles (MR has no fixed scale)."""
    lo, hi = np.percentile(data[::2, ::2, ::2], [0.5, 99.5])  # every 8th voxel: the same window, 8x sooner
    if lo < -500 and hi > 0:
        return CT_WINDOW
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def canonical(affine: np.ndarray):
    """Voxel axes reordered and flipped to the nearest RAS+ axes, with their spacing, so
    the views come out as a radiologist expects whatever the scanner's orientation."""
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    world = [int(np.argmax(np.abs(direction[:, v]))) for v in range(3)]
    if len(set(world)) < 3:  # strongly oblique: keep the voxel order
        world = [0, 1, 2]
    order = [world.index(w) for w in range(3)]
    flips = [v for v in order if direction[world[v], v] < 0]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[order]
    return order, flips, spacing


def _views(vol, labels, centre):
    """Axial, coronal, sagittal 2-D arrays (rows top to bottom) of intensity and labels,
    radiological convention: patient's right on the image's left, anterior / superior up."""
    order, flips, sp = canonical(vol.affine)

    def ras(a):
        return np.flip(a, flips).transpose(order) if flips else a.transpose(order)
    img, lab = ras(vol.data), ras(labels)
    c = [centre[v] if v not in flips else vol.data.shape[v] - 1 - centre[v] for v in order]
    views = []
    for name, take, (px_w, px_h) in (("axial", lambda a: a[:, :, c[2]].T[::-1, ::-1], (sp[0], sp[1])),
                                      ("coronal", lambda a: a[:, c[1], :].T[::-1, ::-1], (sp[0], sp[2])),
                                      ("sagittal", lambda a: a[c[0], :, :].T[::-1, ::-1], (sp[1], sp[2]))):
        views.append((name, take(img), take(lab), px_w, px_h))
    return views


def preview_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The labelled voxel nearest the labels' centre of mass (so every view cuts through a
    structure, even a ring), or the volume centre when nothing is labelled."""
    fg = np.argwhere(labels > 0)
    if not len(fg):
        return tuple(s // 2 for s in labels.shape)
    return tuple(int(v) for v in fg[np.argmin(((fg - fg.mean(0)) ** 2).sum(1))])


def render_preview(labels: np.ndarray, vol, names=None, alpha: float = ALPHA, window=None, centre=None):
    """The picture (PIL RGB) and its layout: for each view its box in the picture, the
    mm per pixel and the centre voxel, so a caller can find a voxel on it."""
    from PIL import Image, ImageDraw
    if labels.shape != vol.data.shape:
        from .errors import InputError
        raise InputError(f"label map {labels.shape} does not match the volume {vol.data.shape}")
    lo, hi = window or intensity_window(vol.data)
    centre = tuple(centre) if centre is not None else preview_centre(labels)
    views = _views(vol, labels, centre)
    extent = max(max(v[1].shape[1] * v[3], v[1].shape[0] * v[4]) for v in views)
    mm_per_px = extent / PANEL_PX
    colours = label_colours(int(labels.max(initial=0)) + 1)
    panels, layout = [], {"mm_per_px": mm_per_px, "centre": centre, "views": {}}
    for name, img, lab, px_w, px_h in views:
        size = (max(1, round(img.shape[1] * px_w / mm_per_px)), max(1, round(img.shape[0] * px_h / mm_per_px)))
        grey = np.clip((img.astype(np.float32) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
        grey = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR))
        lab = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(size, Image.NEAREST))
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        fg = lab > 0
        rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[lab[fg]]
        panels.append((name, Image.fromarray(np.round(rgb).astype(np.uint8))))
    gap = 8
    present = [int(v) for v in np.unique(labels) if v > 0]
    width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    columns = max(1, (width - gap) // LEGEND_COLUMN)
    height = max(p.height for _, p in panels) + 2 * gap + 16 + LEGEND_ROW * max(1, -(-len(present) // columns))
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw, x = ImageDraw.Draw(canvas), gap
    for name, panel in panels:
        canvas.paste(panel, (x, gap + 16))
        draw.text((x, 2), name, fill=(255, 255, 255))
        layout["views"][name] = (x, gap + 16, x + panel.width, gap + 16 + panel.height)
        x += panel.width + gap
    layout["legend"] = _legend(draw, present, names, colours, gap, max(p.height for _, p in panels) + 2 * gap + 16,
                               columns)
    return canvas, layout


def _legend(draw, present, names, colours, x0, y0, columns):
    """A swatch and name per label present, in columns; returns [(class id, name, swatch box)]."""
    rows = []
    if not present:
        draw.text((x0, y0 + 4), "no structures found", fill=(255, 255, 255))
    for n, cls in enumerate(present):
        x, y = x0 + (n % columns) * LEGEND_COLUMN, y0 + (n // columns) * LEGEND_ROW
        box = (x, y + 2, x + 15, y + 17)
        name = label_name(names, cls)
        draw.rectangle(box, fill=tuple(int(v) for v in colours[cls]))
        draw.text((x + 22, y + 4), f"{cls}: {name}"[:28], fill=(255, 255, 255))
        rows.append((cls, name, box))
    return rows


def label_name(names, cls: int) -> str:
    """The bundle's name for a class id, or "class N" where the bundle has none."""
    return str(names[cls]) if names and 0 <= cls < len(names) and names[cls] else f"class {cls}"


def write_preview(labels: np.ndarray, vol, path, names=None, overwrite: bool = False, **options) -> Path:
    """A PNG preview, written atomically like the label maps; the legend is also kept as
    PNG text ("omedge:legend": "1=liver;2=kidney") for scripts that check it."""
    from PIL.PngImagePlugin import PngInfo

    from .io.volume import check_output, write_atomic
    path = check_output(path, overwrite, (".png",), "a preview is written as PNG")
    image, layout = render_preview(labels, vol, names, **options)
    info = PngInfo()
    info.add_text("omedge:legend", ";".join(f"{cls}={name}" for cls, name, _ in layout["legend"]))
    return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def overlay_masks(image: np.ndarray, masks: np.ndarray, boxes=None, alpha: float = ALPHA):
    """The input picture (H, W, 3 uint8) with prompt i's mask tinted in palette colour
    i + 1 (as in the label PNG) and its box outlined in the same colour."""
    from PIL import Image, ImageDraw
    out = image.astype(np.float32)
    colours = label_colours(len(masks) + 1)
    for i, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * colours[i + 1]
    pic = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for i, box in enumerate(boxes or []):
        if box is not None:
            draw.rectangle([float(v) for v in box], outline=tuple(int(c) for c in colours[i + 1]), width=2)
    return pic


def write_overlay(image: np.ndarray, masks: np.ndarray, path, boxes=None, overwrite: bool = False) -> Path:
    """`overlay_masks` as a PNG, written atomically."""
    from .io.volume import check_output, write_atomic
    path = check_output(path, overwrite, (".png",), "a preview is written as PNG")
    pic = overlay_masks(image, masks, boxes)
    return write_atomic(path, lambda f: pic.save(f, format="PNG"))


def bar_chart(labels: list[str], probabilities, title: str = "", width: int = 560):
    """Class probabilities as horizontal bars, the top class in palette colour 1, the others
    grey; each bar says its class and percentage. Long class names are shortened."""
    from PIL import Image, ImageDraw
    probs = np.asarray(probabilities, np.float64).reshape(-1)
    row, top, left = 26, 30 if title else 8, 8
    pic = Image.new("RGB", (width, top + row * len(probs) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    if title:
        draw.text((left, 8), title[:80], fill=(0, 0, 0))
    best, bar_w = int(probs.argmax()), width - 2 * left
    colours = label_colours(2)
    for i, (name, p) in enumerate(zip(labels, probs)):
        y = top + i * row
        fill = tuple(int(c) for c in colours[1]) if i == best else (190, 190, 190)
        draw.rectangle([left, y, left + max(1, int(bar_w * float(p))), y + row - 6], fill=fill)
        text = str(name) if len(str(name)) <= 60 else str(name)[:57] + "..."
        draw.text((left + 4, y + 4), f"{text}  {100 * float(p):.1f}%", fill=(0, 0, 0))
    return pic


def write_bar_chart(path, labels, probabilities, title: str = "", overwrite: bool = False) -> Path:
    """`bar_chart` as a PNG, written atomically."""
    from .io.volume import check_output, write_atomic
    path = check_output(path, overwrite, (".png",), "a chart is written as PNG")
    pic = bar_chart(labels, probabilities, title)
    return write_atomic(path, lambda f: pic.save(f, format="PNG"))
