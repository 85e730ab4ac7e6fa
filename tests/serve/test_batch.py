"""`omedge batch` locally: folder / file list / manifest CSV in, Parquet out (NIfTI label
maps + a Parquet index for volume bundles), per-item failures as rows, resume."""
from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import pytest

import omedge
from omedge.batch import run_batch
from omedge.errors import InputError, UsageError
from omedge.manifest import stored_hash
from tests.conftest import write_tiles

CORRUPT = "tile_005b.png"   # sorts between tile_005.png and tile_006.png: the middle of the job


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    write_tiles(folder, 12, size=224, seed=3)
    (folder / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    return folder


@pytest.fixture(scope="module")
def expected(brow_fp32_bundle, tile_dir):
    """p.predict on the same files, in the same order (the corrupt one left out)."""
    files = sorted(str(p) for p in tile_dir.glob("*.png") if p.name != CORRUPT)
    out = omedge.load(brow_fp32_bundle).predict(files, return_dict=True)
    return files, out


def rows_by_item(path):
    t = pq.read_table(path)
    return t, {r["item"]: r for r in t.to_pylist()}


def test_folder_with_a_corrupt_file_on_two_processes(brow_fp32_bundle, tile_dir, expected, tmp_path):
    out = tmp_path / "features.parquet"
    res = run_batch(brow_fp32_bundle, tile_dir, out, workers=2, threads=1, chunk_size=4)
    assert res["complete"] and res["items"] == 13 and res["ok"] == 12 and res["failed"] == 1
    table, rows = rows_by_item(out)
    assert table.num_rows == 13 and not (tmp_path / "features.parquet.parts").exists()
    assert {"item", "ok", "error", "seconds", "bundle_sha256", "finished_at", "embedding"} <= set(table.column_names)
    bad = rows[str(tile_dir / CORRUPT)]
    assert bad["ok"] is False and "tile_005b.png" in bad["error"] and bad["embedding"] is None
    assert "Traceback" not in bad["error"]
    files, ref = expected
    got = np.array([rows[f]["embedding"] for f in files], np.float32)
    assert got.shape == ref["embedding"].shape
    np.testing.assert_allclose(got, ref["embedding"], rtol=0, atol=1e-6)
    assert set(table.column("bundle_sha256").to_pylist()) == {stored_hash(brow_fp32_bundle)}
    assert table.column("item").to_pylist() == sorted(str(p) for p in tile_dir.glob("*.png"))  # input order


def test_rerun_resumes_and_retries_failures(brow_fp32_bundle, tile_dir, tmp_path):
    out = tmp_path / "f.parquet"
    first = run_batch(brow_fp32_bundle, tile_dir, out, workers=1, chunk_size=4, max_chunks=2)  # "interrupted"
    assert not first["complete"] and first["computed"] == 8 and not out.exists()
    parts = sorted((tmp_path / "f.parquet.parts").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    before = {r["item"]: r["finished_at"] for p in parts for r in pq.read_table(p).to_pylist()}
    assert sum(not pq.read_table(p).column("ok").to_pylist()[i] for p in parts for i in range(4)) == 1  # corrupt
    second = run_batch(brow_fp32_bundle, tile_dir, out, workers=1, chunk_size=4)
    # the 7 good items of the first run are not recomputed; the corrupt one is retried
    assert second["complete"] and second["skipped"] == 7 and second["computed"] == 6
    _, rows = rows_by_item(out)
    for item, t in before.items():
        if rows[item]["ok"]:
            assert rows[item]["finished_at"] == t
        else:
            assert rows[item]["finished_at"] > t
    third = run_batch(brow_fp32_bundle, tile_dir, out, workers=1, chunk_size=4)  # resumes from the merged OUT
    assert third["skipped"] == 12 and third["computed"] == 1 and third["ok"] == 12


def test_manifest_csv_and_file_list(brow_fp32_bundle, tile_dir, expected, tmp_path):
    files, ref = expected
    csv = tile_dir / "archive.csv"  # relative paths, as an archive's manifest has them
    names = [f.rsplit("/", 1)[1] for f in files[:5]] + [CORRUPT]
    csv.write_text("path,patient_id,site\n" + "".join(f"{n},{100 + i},s{i % 2}\n" for i, n in enumerate(names)))
    out = tmp_path / "csv.parquet"
    run_batch(brow_fp32_bundle, csv, out, chunk_size=4)
    t = pq.read_table(out)
    assert t.column("patient_id").to_pylist() == list(range(100, 106)) and str(t.schema.field("patient_id").type) == "int64"
    assert t.column("site").to_pylist() == ["s0", "s1"] * 3 and t.column("ok").to_pylist() == [True] * 5 + [False]
    np.testing.assert_allclose(np.array(t.column("embedding").to_pylist()[:5]), ref["embedding"][:5], atol=1e-6)
    listing = tmp_path / "list.txt"
    listing.write_text("# two tiles\n" + "\n".join(files[:2]) + "\n\n")
    run_batch(brow_fp32_bundle, listing, tmp_path / "l.parquet")
    assert pq.read_table(tmp_path / "l.parquet").column("item").to_pylist() == files[:2]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,x\na.png,1\n")
    with pytest.raises(InputError, match="no `path` column"):
        run_batch(brow_fp32_bundle, bad, tmp_path / "b.parquet")


def test_refusals(brow_fp32_bundle, tile_dir, tmp_path):
    with pytest.raises(UsageError, match="cores"):
        run_batch(brow_fp32_bundle, tile_dir, tmp_path / "x.parquet", workers=64, threads=2)
    with pytest.raises(UsageError, match="is a folder"):
        run_batch(brow_fp32_bundle, tile_dir, tmp_path)
    with pytest.raises(InputError, match="not found"):
        run_batch(brow_fp32_bundle, tmp_path / "nowhere", tmp_path / "x.parquet")


def test_a_killed_pool_worker_is_replaced(brow_fp32_bundle, tile_dir, expected, tmp_path):
    """SIGKILL one of the two worker processes while the job runs: its chunks run again
    in a fresh pool, and every item still gets its result."""
    import os
    import signal
    import threading
    import time

    import psutil
    state = {"killed": None, "done": False}

    def killer():
        deadline = time.monotonic() + 60
        while not state["done"] and time.monotonic() < deadline:
            kids = [c for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())]
            if kids:
                state["killed"], state["while_running"] = kids[0].pid, not state["done"]
                os.kill(kids[0].pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_batch(brow_fp32_bundle, tile_dir, tmp_path / "k.parquet", workers=2, threads=1, chunk_size=2)
    state["done"] = True
    t.join(10)
    assert state["killed"] and state["while_running"]
    assert res["complete"] and res["ok"] == 12 and res["failed"] == 1   # only the corrupt file
    _, rows = rows_by_item(tmp_path / "k.parquet")
    files, ref = expected
    np.testing.assert_allclose(np.array([rows[f]["embedding"] for f in files]), ref["embedding"], atol=1e-6)


def test_cli_command(brow_fp32_bundle, tile_dir, tmp_path, capsys):
    import json

    from omedge.batch_cli import add_parser
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", str(brow_fp32_bundle), str(tile_dir), "-o", str(tmp_path / "c.parquet"),
                              "--workers", "1", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 13 and report["ok"] == 12 and report["failed"] == 1


@pytest.fixture(scope="module")
def volume_bundle(tmp_path_factory):
    """A tiny STU-Net (ONNX only, as tests/kinds/test_volume.py), made cheaper still by nnU-Net
    plans beside the checkpoint that give 32^3 windows at 3 mm."""
    import pickle

    import torch

    from omedge import models
    d = tmp_path_factory.mktemp("vol")
    sd = models.build(models.get_spec("stu-net"), "tiny", num_classes=3).state_dict()
    torch.save({"epoch": 1, "state_dict": sd}, d / "tiny.model")
    stage = {"current_spacing": np.array([3.0, 3.0, 3.0]), "patch_size": np.array([32, 32, 32])}
    with open(d / "tiny.model.pkl", "wb") as f:
        pickle.dump({"plans": {"plans_per_stage": {0: stage}, "normalization_schemes": {0: "nonCT"}}}, f)
    return omedge.export("stu-net", d / "tiny.model", formats=["onnx"], labels=["bg", "a", "b"], out=d / "stunet")


def test_volume_bundle_writes_a_folder_of_label_maps(volume_bundle, tmp_path):
    from omedge.io.volume import read_volume
    from omedge.runtime.volume import synthetic_ct
    from tests.io.test_volume_io import nifti
    src = tmp_path / "cts"
    src.mkdir()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(2):
        nifti(src, synthetic_ct((40, 36, 24), seed=i).data, affine, f"ct{i}.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    out = tmp_path / "seg"
    res = run_batch(volume_bundle, src, out)
    assert res["complete"] and res["ok"] == 2 and res["failed"] == 1
    rows = {r["item"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert rows[str(src / "broken.nii.gz")]["ok"] is False and rows[str(src / "broken.nii.gz")]["error"]
    p = omedge.load(volume_bundle)
    for i in range(2):
        row = rows[str(src / f"ct{i}.nii.gz")]
        assert row["ok"] and row["output"] == str(out / f"ct{i}_seg.nii.gz") and row["shape"] == [40, 36, 24]
        labels, _ = p.segment(src / f"ct{i}.nii.gz")
        seg = read_volume(row["output"])
        np.testing.assert_array_equal(seg.data.astype(labels.dtype), labels)
        assert np.allclose(seg.affine, affine)
    assert sorted(f.name for f in out.iterdir()) == ["ct0_seg.nii.gz", "ct1_seg.nii.gz", "index.parquet"]
