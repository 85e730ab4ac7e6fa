"""Which items an `omedge batch` job has: a folder (files with the bundle's suffixes, or DICOM
series folders), a manifest CSV with a `path` column (other columns carried into the output),
or a text file of paths; and the label-map file names of segmentation jobs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError


@dataclass
class Inputs:
    items: list[str]                  # resolved paths, in input order
    extra: object = None              # pyarrow Table of carried columns (manifest CSV), one row per item
    outputs: dict = field(default_factory=dict)   # item -> label map file name (segmentation)


def read_inputs(source, suffixes: tuple[str, ...], volumes: bool = False) -> Inputs:
    """A folder (files with the bundle's suffixes), a manifest CSV with a `path` column
    (other columns carried through), or a text file of paths, one a line. Relative
    paths in a list are relative to the list's folder."""
    src = Path(source)
    if src.is_dir():
        return Inputs([str(p) for p in _folder_items(src, suffixes, volumes)])
    if not src.is_file():
        raise InputError(f"batch input not found: {src}", "give a folder, a .csv manifest or a text file of paths")
    if src.suffix.lower() == ".csv":
        return _read_csv(src)
    try:
        lines = [line.strip() for line in src.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the file list {src}: {e}") from None
    items = [str(src.parent / Path(line).expanduser()) for line in lines if line and not line.startswith("#")]
    if not items:
        raise InputError(f"{src} lists no paths", "one path per line; lines starting with # are skipped")
    return Inputs(items)


def _folder_items(folder: Path, suffixes, volumes: bool) -> list[Path]:
    if volumes:  # NIfTI files and DICOM series folders, as `omedge predict` takes them
        from .kinds.base import paths_in
        return [p for p in paths_in(folder, suffixes, "NIfTI volume or DICOM series") if not p.name.startswith(".")]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise InputError(f"no inputs in {folder}", f"expected files ending in {', '.join(sorted(suffixes))}")
    return files


def _read_csv(path: Path) -> Inputs:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    try:
        table = pcsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read the manifest {path}: {str(e)[:300]}") from None
    if "path" not in table.column_names:
        raise InputError(f"{path} has no `path` column", f"its columns are: {', '.join(table.column_names)}")
    paths = [str(p or "").strip() for p in table.column("path").to_pylist()]
    if not all(paths):
        raise InputError(f"{path}: the `path` column has empty cells")
    return Inputs([str(path.parent / Path(p).expanduser()) for p in paths], table.drop_columns(["path"]))


def label_map_names(items: list[str]) -> dict:
    """`<name>_seg.nii.gz` per input; names that two inputs share get a short hash of the path."""
    from collections import Counter
    stems = {i: Path(i).name.removesuffix(".gz").removesuffix(".nii") for i in items}
    counts = Counter(stems.values())
    return {i: (s if counts[s] == 1 else f"{s}-{hashlib.sha256(i.encode()).hexdigest()[:8]}") + "_seg.nii.gz"
            for i, s in stems.items()}
