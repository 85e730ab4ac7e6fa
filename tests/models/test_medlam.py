"""MedLAM (the localiser of MedLSAM) and the localise-then-segment pipeline of omedge.medlsam:
official-layout checkpoints, each preprocessing step against its definition (or the library
it replaces), and the pipeline end to end on a synthetic CT with a synthetic support set."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from omedge import medlsam
from omedge.errors import CheckpointError, InputError, UsageError
from omedge.io.volume import Volume, read_volume, write_labels
from omedge.models.medlam import FEATURES, build_medlam, load_medlam, remap_medlam
from omedge.runtime.volume import dice_per_class
from tests.conftest import official_state_dict
from tests.medlsam_data import (
    ORGANS,
    band_localise,
    phantom,
    save,
    support_folder,
    threshold_sam,
)

PATCH = 32  # the tiny variant's patch


def official_file(path, variant="tiny", seed=0):
    """medlam.pth as released: flat state_dict, DataParallel `module.` prefix, fp16 tensors
    (saved from a .half() model), fan-in-scaled random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_medlam(variant).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        sd["module." + k] = (torch.randn(shape, generator=g) / fan_in ** 0.5).half()
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def medlam_pth(tmp_path_factory):
    return official_file(tmp_path_factory.mktemp("medlam") / "medlam.pth")


@pytest.fixture
def one_thread():
    """Two cores shared by many jobs: torch's two threads there run 10x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def support_dir(tmp_path_factory):
    return support_folder(tmp_path_factory.mktemp("support") / "support")


def torch_localise(model):
    def run(patches):
        with torch.no_grad():
            return {k: v.numpy() for k, v in model(torch.from_numpy(patches)).items()}
    return run


def test_official_layout_loads_strictly_and_upcasts(medlam_pth):
    raw = torch.load(medlam_pth, weights_only=True)
    assert len(raw) == 44 and all(k.startswith("module.") for k in raw)
    model, variant = load_medlam(medlam_pth)
    assert variant == "tiny"
    sd = model.state_dict()
    assert len(sd) == 44 and all(v.dtype == torch.float32 for v in sd.values())
    torch.testing.assert_close(sd["fc1.weight"], raw["module.fc1.weight"].float(), rtol=0, atol=0)
    out = model(torch.zeros(2, 1, PATCH, PATCH, PATCH))
    assert out["position"].shape == (2, 3) and out["feature2"].shape[2:] == (PATCH,) * 3
    assert out["feature0"].shape[2:] == (PATCH // 4,) * 3 and out["feature1"].shape[2:] == (PATCH // 2,) * 3


def test_official_size_matches_the_release(tmp_path):
    model, variant = load_medlam(official_file(tmp_path / "medlam.pth", "official"))
    assert variant == "official" and model.patch == 64
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 15.1


def test_wrong_files_say_what_they_are(medlam_pth, tmp_path):
    sam = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
           "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.zeros(2, 128),
           "mask_decoder.iou_token.weight": torch.zeros(1, 256)}
    with pytest.raises(CheckpointError, match="looks like a SAM/MedSAM image encoder"):
        remap_medlam(sam)
    torch.save(sam, tmp_path / "medsam_vit_b.pth")
    with pytest.raises(CheckpointError, match="SAM/MedSAM"):
        load_medlam(tmp_path / "medsam_vit_b.pth")
    raw = torch.load(medlam_pth, weights_only=True)
    del raw["module.fc3.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(e.g. fc3.bias\)"):
        remap_medlam(raw)
    with pytest.raises(CheckpointError, match="looks like a 'brow'"):
        remap_medlam(official_state_dict("brow"))


def test_hu_mapping_is_the_official_piecewise_line():
    hu = np.array([-3000, -1000, -600, -200, 0, 199.9, 200, 850, 1499, 1500, 4000], np.float32)
    want = np.zeros_like(hu)   # img_multi_thresh_normalized, segment by segment
    for (t0, t1), (v0, v1) in zip(zip(medlsam.HU_POINTS, medlsam.HU_POINTS[1:]),
                                  zip(medlsam.HU_VALUES, medlsam.HU_VALUES[1:])):
        inside = (hu >= t0) & (hu < t1)
        want[inside] = v0 + (v1 - v0) / (t1 - t0) * (hu[inside] - t0)
    want[hu >= 1500] = 1
    np.testing.assert_allclose(medlsam.hu_piecewise(hu), want, atol=1e-6)


@pytest.mark.parametrize("perm,signs", [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, 1, 1)), ((2, 0, 1), (1, -1, 1)),
                                        ((1, 2, 0), (-1, -1, -1))])
def test_las_reorientation_matches_nibabel(perm, signs):
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
    data = np.random.default_rng(1).normal(size=(9, 7, 5)).astype(np.float32)
    affine = np.eye(4)
    for ax, (w, s) in enumerate(zip(perm, signs)):
        affine[:, ax] = 0
        affine[w, ax] = 3.0 * s      # 3 mm: no resampling, the reorientation alone is compared
    affine[:3, 3] = [10, -20, 5]
    img = nib.Nifti1Image(data, affine)
    ref = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt("LAS"))).get_fdata()
    arr, zoom, m = medlsam.to_las(Volume(data, affine, "t"))
    np.testing.assert_array_equal(zoom, 1)
    np.testing.assert_array_equal(arr, ref.transpose(2, 1, 0))
    t = np.array([2, 3, 1, 1.0])   # the voxel map: LAS index -> input index holds the same value
    assert ref[tuple(t[:3].astype(int))] == data[tuple((m @ t)[:3].astype(int))]


@pytest.mark.parametrize("shape,scale", [((5, 7, 6), None), ((11, 4, 9), None), ((8, 10, 12), (1.6, 1.25, 2.0))])
def test_linear_resize_is_torch_trilinear(shape, scale):
    a = np.random.default_rng(2).normal(size=(6, 8, 6)).astype(np.float32)
    x = torch.from_numpy(a)[None, None]
    ref = (torch.nn.functional.interpolate(x, scale_factor=scale, mode="trilinear") if scale
           else torch.nn.functional.interpolate(x, size=shape, mode="trilinear"))[0, 0].numpy()
    np.testing.assert_allclose(medlsam.linear_resize(a, ref.shape, scale), ref, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4, 3])
def test_correlation_is_the_official_grouped_conv(k):
    rng = np.random.default_rng(k)
    q, w = rng.normal(size=(5, 12, 10, 11)).astype(np.float32), rng.normal(size=(5, k, k, k)).astype(np.float32)
    conv = torch.nn.functional.conv3d(torch.from_numpy(q)[None], torch.from_numpy(w)[None], padding=k // 2)
    np.testing.assert_allclose(medlsam.correlate(q, w), conv[0, 0].numpy(), atol=1e-4)


def test_extreme_points_are_the_middle_voxels_of_the_extreme_slices():
    mask = np.zeros((12, 10, 9), bool)
    mask[3:9, 2:7, 4:8] = True
    mask[2, 5, 6] = mask[9, 4, 4] = True
    pts = medlsam.extreme_points(mask)
    assert pts[:3].diagonal().tolist() == [2, 2, 4] and pts[3:].diagonal().tolist() == [9, 6, 7]
    assert pts[0].tolist() == [2, 5, 6] and pts[3].tolist() == [9, 4, 4] and mask[tuple(pts.T)].all()
    zs, ys = np.nonzero(mask[:, :, 4])   # min x: the slice x=4 read in axes (ax-2, ax-1) = (z, y)
    assert pts[2].tolist() == [zs[len(zs) // 2], ys[len(ys) // 2], 4]


def test_slice_resize_is_skimage_resize():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 420)).astype(np.int32)
    img[:30] = 0
    try:
        from skimage.transform import resize
    except ImportError:   # an independent check: an order-2 spline reproduces a ramp inside the image
        ramp = np.add.outer(np.arange(256.0), 0.5 * np.arange(256.0))
        out = medlsam.resize_slice(ramp, (512, 512))
        src = (np.arange(512) + 0.5) / 2 - 0.5
        np.testing.assert_allclose(out[40:-40, 40:-40], np.add.outer(src, 0.5 * src)[40:-40, 40:-40], atol=1e-6)
        return
    for shape in [(1024, 1024), (128, 100)]:   # up (no smoothing) and down (Gaussian anti-aliasing)
        ref = resize(img, shape, order=2, preserve_range=True, mode="constant", anti_aliasing=True)
        np.testing.assert_allclose(medlsam.resize_slice(img, shape), ref, atol=1e-9)


def test_slice_images_and_boxes_follow_medlsam():
    import cv2
    vol, _ = phantom(shape=(30, 26, 12))
    vol.data[3, 4, 5] = 0.0   # a raw 0 stays 0
    grey = np.clip(vol.data, -500, 1000)
    grey = ((grey - grey.min()) / (grey.max() - grey.min()) * 255.0)
    grey[vol.data == 0] = 0
    want = medlsam.resize_slice(grey.astype(np.int32)[:, :, 5].T).astype(np.uint8)
    got = medlsam.SliceImages(vol)(5)
    assert got.shape == (1024, 1024, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, :, 0], want)
    np.testing.assert_array_equal(got[:, :, 2], want)
    box = medlsam.box_1024([[3, 5, 0], [20, 15, 4]], (30, 26))
    np.testing.assert_array_equal(box, [round(3 * 1024 / 30) - 10, round(5 * 1024 / 26) - 10,
                                        round(20 * 1024 / 30) + 10, round(15 * 1024 / 26) + 10])
    mask = np.random.default_rng(4).random((1024, 1024)) > 0.5
    np.testing.assert_array_equal(medlsam.nearest_resize(mask, (26, 30)),
                                  cv2.resize(mask.astype(np.uint8), (30, 26), interpolation=cv2.INTER_NEAREST) > 0)


def true_box(labels, c):
    nz = np.nonzero(labels == c)
    return np.array([np.min(nz, 1), np.max(nz, 1)])


def test_pipeline_lands_on_the_organs_and_keeps_the_grid(support_dir, tmp_path):
    query, truth = phantom(seed=3, shift_mm=(-2.0, 3.0, -3.0))
    affine = query.affine.copy()
    embed, segment = threshold_sam()
    seen = []
    r = medlsam.segment_volume(save(tmp_path / "q.nii.gz", query.data, affine), support_dir, band_localise, embed,
                               segment, patch=PATCH, names={1: "liver", 2: "kidney", 3: "spleen"},
                               progress=lambda i, n: seen.append((i, n)))
    assert r.labels.shape == query.data.shape and set(r.boxes) == set(ORGANS)
    assert seen[-1] == (r.slices, r.slices) and len(seen) == r.slices
    for c in ORGANS:
        err = np.abs(np.array(r.boxes[c]) - true_box(truth, c))
        assert err.max() <= 5, (c, r.boxes[c], true_box(truth, c).tolist())
        centre = np.mean(r.boxes[c], axis=0)
        assert truth[tuple(np.round(centre).astype(int))] == c
    assert set(r.volumes_ml) == {"liver", "kidney", "spleen"} and all(v > 0 for v in r.volumes_ml.values())
    out = write_labels(r.labels, read_volume(tmp_path / "q.nii.gz"), tmp_path / "seg.nii.gz")
    seg = read_volume(out)
    assert seg.data.shape == query.data.shape and np.allclose(seg.affine, affine)
    np.testing.assert_array_equal(seg.data, r.labels)


def test_query_in_another_orientation_gives_the_same_organs(support_dir, tmp_path):
    query, _ = phantom(seed=3, shift_mm=(-2.0, 3.0, -3.0))
    embed, segment = threshold_sam()
    ref = medlsam.segment_volume(query, support_dir, band_localise, embed, segment, patch=PATCH)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])   # i and j reversed, world positions unchanged
    flip[:2, 3] = np.array(query.data.shape[:2]) - 1
    flipped = Volume(np.ascontiguousarray(query.data[::-1, ::-1]), query.affine @ flip, "flipped")
    nnunet = support_folder(tmp_path / "nnunet", layout="nnunet")
    got = medlsam.segment_volume(flipped, nnunet, band_localise, embed, segment, patch=PATCH)
    n = np.array(query.data.shape) - 1
    for c, ((i0, j0, k0), (i1, j1, k1)) in got.boxes.items():   # the same boxes in the scanner's space
        assert ref.boxes[c] == [[n[0] - i1, n[1] - j1, k0], [n[0] - i0, n[1] - j0, k1]]
    # MedLSAM maps voxel i to i * 1024 / n in the SAM grid (a voxel's edge, not its centre): reversed
    # axes move the 2-D box by up to one voxel, so the masks agree closely but not exactly
    dice = dice_per_class(ref.labels, got.labels[::-1, ::-1])
    assert len(dice) == 3 and all(d >= 0.75 for d in dice.values()), dice


def test_torch_and_onnxruntime_medlam_give_the_same_label_map(medlam_pth, support_dir, tmp_path, one_thread):
    import onnxruntime as ort
    model, _ = load_medlam(medlam_pth)
    path = tmp_path / "medlam.onnx"
    names = ["position", *FEATURES]
    torch.onnx.export(model, (torch.zeros(1, 1, PATCH, PATCH, PATCH),), str(path), input_names=["patch"],
                      output_names=names, dynamic_axes={n: {0: "batch"} for n in ["patch", *names]},
                      opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def ort_localise(patches):
        return dict(zip(names, sess.run(names, {"patch": patches})))
    query, _ = phantom(seed=5, shift_mm=(1.0, -2.0, 2.0))
    embed, segment = threshold_sam(50)   # random weights put the boxes anywhere: segment all body inside them
    runs = [medlsam.segment_volume(query, support_dir, loc, embed, segment, patch=PATCH, n_crops=4)
            for loc in (torch_localise(model), ort_localise)]
    assert runs[0].boxes == runs[1].boxes
    assert all(np.prod(np.subtract(hi, lo) + 1) > 1 for lo, hi in runs[0].boxes.values()), runs[0].boxes
    dice = dice_per_class(runs[0].labels, runs[1].labels)
    assert dice and all(d >= 0.99 for d in dice.values()), dice


def test_bad_support_and_query_are_refused(support_dir, tmp_path):
    query, truth = phantom(seed=3)
    embed, segment = threshold_sam()
    run = lambda q, s, **kw: medlsam.segment_volume(q, s, band_localise, embed, segment, patch=PATCH, **kw)
    bare = tmp_path / "bare"
    bare.mkdir()
    save(bare / "case0.nii.gz", query.data, query.affine)
    with pytest.raises(InputError, match="case0.nii.gz has no label map"):
        run(query, bare)
    with pytest.raises(InputError, match="class 7 is not labelled in support"):
        run(query, support_dir, classes=[1, 7])
    empty = tmp_path / "empty"
    empty.mkdir()
    save(empty / "a.nii.gz", query.data, query.affine)
    save(empty / "a_label.nii.gz", np.zeros_like(truth), query.affine)
    with pytest.raises(InputError, match="has no labels"):
        run(query, empty)
    with pytest.raises(UsageError, match="is not a folder"):
        run(query, tmp_path / "nowhere")
    flat = Volume(query.data[:, :, :1].copy(), query.affine, "one slice")
    with pytest.raises(InputError, match="2-D image"):
        run(flat, support_dir)
    with pytest.raises(InputError, match="Hounsfield"):
        run(Volume(query.data + 2000, query.affine, "shifted"), support_dir)


def test_run_side_never_imports_torch():
    code = "import sys, omedge.medlsam; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_draft_medlsam_bundle_model_has_three_graphs(medlam_pth, tmp_path):
    from omedge.models import medlsam as family
    from omedge.models import sam
    sam_file = tmp_path / "medsam_vit_b.pth"
    torch.manual_seed(0)
    torch.save(sam.build("tiny").state_dict(), sam_file)
    sd, opts = family.remap(family.combine(medlam_pth, sam_file))
    model = family.build("tiny", **opts)
    model.load_state_dict(sd, strict=True)
    assert set(model.graph_modules()) == {g.role for g in family.SPECS[0].graphs} == {"localiser", "encoder",
                                                                                        "decoder"}
    with pytest.raises(CheckpointError, match="SAM/MedSAM"):   # the two files swapped
        family.combine(sam_file, medlam_pth)
