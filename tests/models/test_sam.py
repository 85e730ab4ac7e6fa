"""SAM / MedSAM: the official segment_anything layout loads strictly (CUDA-tagged MedSAM
files too), a wrong file says what it looks like, and the numpy pre/post-processing
matches independent re-implementations of segment_anything's ResizeLongestSide,
Sam.preprocess and Sam.postprocess_masks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omedge import models
from omedge.errors import CheckpointError
from omedge.kinds.promptable import postprocess_masks, prepare_image, prompt_arrays
from omedge.models.sam import SAM_MEAN, SAM_STD
from tests.conftest import official_state_dict


def test_vit_b_has_the_official_314_tensors_and_shapes():
    with torch.device("meta"):
        model = models.build(models.get_spec("sam"), "vit_b")
    sd = model.state_dict()
    assert len(sd) == 314 and sum(p.numel() for p in model.parameters()) == 93_735_472
    assert sd["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape == (2, 128)
    for i in range(12):  # window 14 -> 27 offsets; global blocks see the whole 64 grid -> 127
        assert sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape == ((127, 64) if i in (2, 5, 8, 11) else (27, 64))
    assert sd["mask_decoder.mask_tokens.weight"].shape == (4, 256)
    assert sd["mask_decoder.output_upscaling.0.weight"].shape == (256, 64, 2, 2)
    assert sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape == (128, 256)
    assert "pixel_mean" not in sd and "pixel_std" not in sd  # non-persistent, as in the official module


def test_strict_load_keeps_the_files_gaussian_matrix(tmp_path):
    sd = official_state_dict("sam", "tiny", seed=3)
    torch.save(sd, tmp_path / "sam_tiny.pth")
    model, variant, _ = models.load(models.get_spec("sam"), tmp_path / "sam_tiny.pth")
    assert variant == "tiny"
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    fresh = models.build(models.get_spec("sam"), "tiny", seed=4).state_dict()[key]
    assert not torch.equal(fresh, sd[key])  # a re-drawn buffer would differ from the file
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_cuda_tagged_medsam_file_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    """MedSAM's file was saved from a GPU: every storage is tagged 'cuda:0'."""
    sd = official_state_dict("medsam", "tiny", seed=5)
    path = tmp_path / "medsam_vit_b.pth"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(sd, path)
    import zipfile
    with zipfile.ZipFile(path) as z:
        assert b"cuda:0" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a loader without map_location hits
    model, variant, _ = models.load(models.get_spec("medsam"), path)
    assert variant == "tiny"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_another_models_file_says_what_it_looks_like(tmp_path):
    torch.save(official_state_dict("brow"), tmp_path / "brow.pth")
    with pytest.raises(CheckpointError, match="looks like a 'brow' checkpoint"):
        models.load(models.get_spec("sam"), tmp_path / "brow.pth")
    # a MedLAM-layout file (DataParallel 3-D U-Net, 'module.' prefix)
    medlam = {"module.inc.conv.0.weight": torch.randn(24, 1, 3, 3, 3), "module.fc1.weight": torch.randn(3, 24)}
    torch.save(medlam, tmp_path / "medlam.pth")
    with pytest.raises(CheckpointError, match="no segment_anything keys") as err:
        models.load(models.get_spec("sam"), tmp_path / "medlam.pth")
    assert "MedLAM" in str(err.value) or "'medlam'" in str(err.value)


def _official_resize_longest_side(img: np.ndarray, target: int) -> np.ndarray:
    """ResizeLongestSide.apply_image, written from its definition: scale = target / long
    side, new side = int(side * scale + 0.5), to_pil_image + torchvision resize (= PIL
    bilinear)."""
    h, w = img.shape[:2]
    scale = target / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    return np.array(Image.fromarray(img).resize((nw, nh), resample=Image.Resampling.BILINEAR))


@pytest.mark.parametrize("size", [(90, 150), (200, 77), (128, 128), (300, 300)])
def test_preprocessing_matches_resize_longest_side_and_sam_preprocess(size):
    rng = np.random.default_rng(sum(size))
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    pre = {"image_size": 128, "mean": SAM_MEAN, "std": SAM_STD}
    got, orig, resized = prepare_image(img, pre)
    x = torch.from_numpy(_official_resize_longest_side(img, 128)).permute(2, 0, 1)[None].float()
    x = (x - torch.tensor(SAM_MEAN).view(-1, 1, 1)) / torch.tensor(SAM_STD).view(-1, 1, 1)
    assert orig == size and resized == tuple(x.shape[-2:])
    x = F.pad(x, (0, 128 - x.shape[-1], 0, 128 - x.shape[-2]))  # Sam.preprocess: pad after normalising
    np.testing.assert_allclose(got, x.numpy(), atol=1e-5)
    # prompts: apply_coords scales x by new_w / old_w and y by new_h / old_h; a box is two corners
    coords, labels = prompt_arrays(orig, resized, boxes=[[5, 6, 40, 50]], points=[[10, 20]], point_labels=[0])
    sx, sy = resized[1] / size[1], resized[0] / size[0]
    np.testing.assert_allclose(coords[0], [[10 * sx, 20 * sy], [5 * sx, 6 * sy], [40 * sx, 50 * sy]], rtol=1e-6)
    assert labels.tolist() == [[0, 2, 3]]


def test_points_without_a_box_get_the_official_padding_point():
    coords, labels = prompt_arrays((100, 100), (128, 128), points=[[10, 10], [50, 60]], point_labels=[1, 0])
    assert labels.tolist() == [[1, 0, -1]] and coords[0, -1].tolist() == [0, 0]


def test_postprocessing_matches_sam_postprocess_masks():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    for orig, resized in (((90, 150), (77, 128)), ((200, 77), (128, 49)), ((40, 40), (128, 128))):
        t = F.interpolate(torch.from_numpy(low), (128, 128), mode="bilinear", align_corners=False)
        t = t[..., :resized[0], :resized[1]]
        t = F.interpolate(t, orig, mode="bilinear", align_corners=False).numpy()
        got = postprocess_masks(low, 128, resized, orig)
        np.testing.assert_allclose(got, t, atol=2e-5)
        decided = np.abs(t) > 1e-4
        assert ((got > 0) == (t > 0))[decided].all()


def test_box_prompt_embedding_is_the_official_corner_embedding():
    """_embed_boxes: corners + 0.5, / input size, random Fourier features, + the corner's
    learned embedding (point_embeddings[2] / [3])."""
    model = models.build(models.get_spec("sam"), "tiny", seed=1)
    pe = model.prompt_encoder
    box = torch.tensor([[[10.0, 20.0], [70.0, 90.0]]])
    got = pe.embed_points(box, torch.tensor([[2.0, 3.0]]))
    c = (box + 0.5) / 128
    c = (2 * c - 1) @ pe.pe_layer.positional_encoding_gaussian_matrix * 2 * np.pi
    want = torch.cat([c.sin(), c.cos()], -1)
    want[:, 0] += pe.point_embeddings[2].weight[0]
    want[:, 1] += pe.point_embeddings[3].weight[0]
    torch.testing.assert_close(got, want)
    pad = pe.embed_points(torch.zeros(1, 1, 2), torch.tensor([[-1.0]]))
    torch.testing.assert_close(pad[0, 0], pe.not_a_point_embed.weight[0])


def test_decoder_graph_with_the_cached_image_side_equals_the_official_decoder(tmp_path):
    """The decoder graph reuses the first block's image projections computed by the encoder
    graph (once per image): the same masks and scores as recomputing them per prompt."""
    torch.save(official_state_dict("sam", "tiny", seed=5), tmp_path / "sam.pth")
    model = models.load(models.get_spec("sam"), tmp_path / "sam.pth")[0].eval()
    x = torch.from_numpy(prepare_image(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8),
                                       {"image_size": 128, "mean": SAM_MEAN, "std": SAM_STD})[0])
    coords, labels = prompt_arrays((96, 128), (96, 128), boxes=[[10, 12, 80, 70], [30, 5, 120, 90]],
                                   points=[[40, 40]], point_labels=[0])
    with torch.no_grad():
        enc = model(x)
        official = model.decode(enc["image_embeddings"], torch.from_numpy(coords), torch.from_numpy(labels))
        cached = model.graph_modules()["decoder"](enc["image_tokens"], enc["image_q"], enc["image_k"],
                                                  enc["image_v"], torch.from_numpy(coords), torch.from_numpy(labels))
    assert enc["image_k"].shape == (1, 64, 16)  # the tiny grid 8 x 8, internal width 32 // 2
    for name in ("low_res_masks", "iou_predictions"):
        torch.testing.assert_close(cached[name], official[name], rtol=1e-5, atol=1e-5)
    assert official["low_res_masks"].shape[0] == 2 and official["low_res_masks"].abs().max() > 0


def test_channels_last_upscaling_equals_the_official_transposed_convolutions():
    """The decoder's output_upscaling (ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d,
    GELU on NCHW) and the hypernetwork product, as written for export (matmuls, channels
    last): the same masks, pixel for pixel."""
    dec = models.build(models.get_spec("sam"), "tiny", seed=2).mask_decoder
    for p in dec.output_upscaling.parameters():  # LayerNorm affine and biases away from 1 / 0
        torch.nn.init.normal_(p, 0.0, 0.5)
    g = torch.Generator().manual_seed(0)
    tokens, hyper = torch.randn(2, 8 * 6, 32, generator=g), torch.randn(2, 4, 4, generator=g)
    with torch.no_grad():
        up = dec.output_upscaling(tokens.transpose(1, 2).reshape(2, 32, 8, 6))
        official = (hyper @ up.reshape(2, 4, -1)).reshape(2, 4, 32, 24)
        got = dec.masks_channels_last(tokens, hyper, 8, 6)
    torch.testing.assert_close(got, official, rtol=1e-5, atol=1e-5)


def _official_attention(att, q, k, v):
    """segment_anything's decoder Attention: project, split heads, softmax(q k^T / sqrt d) v,
    merge heads, out_proj."""
    def split(x):
        b, n, c = x.shape
        return x.reshape(b, n, att.heads, c // att.heads).transpose(1, 2)
    q, k, v = split(att.q_proj(q)), split(att.k_proj(k)), split(att.v_proj(v))
    out = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v
    b, h, n, c = out.shape
    return att.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


@pytest.mark.parametrize("n_tokens", [1, 7, 12])
def test_few_token_attention_equals_the_official_attention(n_tokens):
    """The decoder's two cross attentions written without projecting or head-splitting the
    4096 image tokens (folded into the few prompt tokens' side): the official numbers, in
    both directions, batched, with the image side broadcast from one image, and with the
    first block's image projections given already."""
    from omedge.models.layers.sam_decoder import Attention
    torch.manual_seed(n_tokens)
    att = Attention(256, 8, 2)
    for m in att.modules():
        if isinstance(m, torch.nn.Linear):  # fan-in scaled, biases away from 0
            torch.nn.init.normal_(m.weight, 0.0, m.in_features ** -0.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    image, image_v = torch.randn(1, 4096, 256) * 2, torch.randn(1, 4096, 256)
    tokens, tokens_v = torch.randn(3, n_tokens, 256) * 2, torch.randn(3, n_tokens, 256)
    with torch.no_grad():
        pairs = [(att.tokens_over_image(tokens, image, image_v),
                  _official_attention(att, tokens, image.expand(3, -1, -1), image_v.expand(3, -1, -1))),
                 (att.image_over_tokens(image, tokens, tokens_v),
                  _official_attention(att, image.expand(3, -1, -1), tokens, tokens_v))]
        q, k, v = att.q_proj(image).expand(3, -1, -1), att.k_proj(image), att.v_proj(image_v)
        pairs.append((att.image_over_tokens(q, tokens, tokens_v, projected=True),
                      _official_attention(att, image.expand(3, -1, -1), tokens, tokens_v)))
        pairs.append((att.tokens_over_image(tokens, k, v, projected=True),
                      _official_attention(att, tokens, image.expand(3, -1, -1), image_v.expand(3, -1, -1))))
    for got, official in pairs:
        assert got.shape == official.shape
        torch.testing.assert_close(got, official, rtol=1e-4, atol=2e-5)


def test_batched_hypernetworks_equal_the_four_mask_mlps():
    """The 4 output_hypernetworks_mlps run as 3 stacked matmuls: each mask token through
    its own MLP (Linear-ReLU-Linear-ReLU-Linear), as the official decoder loops over them."""
    dec = models.build(models.get_spec("sam"), "tiny", seed=4).mask_decoder
    for p in dec.output_hypernetworks_mlps.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    tokens = torch.randn(3, 4, dec.iou_token.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        official = []
        for i, mlp in enumerate(dec.output_hypernetworks_mlps):
            x = tokens[:, i]
            for j, layer in enumerate(mlp.layers):
                x = layer(x) if j == len(mlp.layers) - 1 else F.relu(layer(x))
            official.append(x)
        torch.testing.assert_close(dec.hypernetworks(tokens), torch.stack(official, dim=1), rtol=1e-5, atol=1e-6)
