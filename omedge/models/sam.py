"""SAM ViT-B and MedSAM (same architecture): promptable 2-D segmentation as two graphs,
the image encoder (run once per image) and the prompt encoder + mask decoder (run per
prompt, milliseconds). Layout of facebookresearch/segment-anything: a flat state_dict of
314 tensors; pixel_mean/std are non-persistent buffers (not in the file); the prompt
encoder's random Gaussian matrix IS in the file and is loaded, never re-drawn."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..spec import GraphSpec, ModelSpec, TensorSpec
from .checkpoint import strip_prefix, unwrap
from .layers.sam import ImageEncoderViT, PromptEncoder
from .layers.sam_decoder import MaskDecoder, tokens_of

SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]
# tiny: the same code at test size (grid 8 padded to windows of 3, decoder width 32)
SIZES = {
    "vit_b": {"img_size": 1024, "dim": 768, "depth": 12, "heads": 12, "window": 14, "global_blocks": (2, 5, 8, 11),
              "out": 256, "dec_heads": 8, "mlp_dim": 2048, "mask_in": 16},
    "tiny": {"img_size": 128, "dim": 32, "depth": 4, "heads": 2, "window": 3, "global_blocks": (1, 3), "out": 32,
             "dec_heads": 2, "mlp_dim": 64, "mask_in": 4},
}
PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class Sam(nn.Module):
    def __init__(self, img_size, dim, depth, heads, window, global_blocks, out, dec_heads, mlp_dim, mask_in):
        super().__init__()
        self.img_size, self.grid = img_size, img_size // 16
        self.image_encoder = ImageEncoderViT(img_size, 16, dim, depth, heads, 4.0, out, window, global_blocks)
        self.prompt_encoder = PromptEncoder(out, self.grid, img_size, mask_in)
        self.mask_decoder = MaskDecoder(out, dec_heads, mlp_dim)
        self.register_buffer("pixel_mean", torch.tensor(SAM_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_STD).view(-1, 1, 1), persistent=False)

    def forward(self, pixel_values):
        """Normalised, padded image -> embedding, and the decoder's image-side projections
        that no prompt changes (the first graph, run once per image; what `bench` times)."""
        emb = self.image_encoder(pixel_values)
        return {"image_embeddings": emb, **self.mask_decoder.image_side(emb, self.prompt_encoder.dense_pe(),
                                                                        self._dense())}

    def _dense(self):
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def decode(self, image_embeddings, point_coords, point_labels):
        """The official decoder on an embedding, everything recomputed per call."""
        return self._decode(tokens_of(image_embeddings + self._dense()), point_coords, point_labels)

    def decode_cached(self, image_tokens, image_q, image_k, image_v, point_coords, point_labels):
        """The decoder graph: prompts against one image's cached encoder outputs."""
        side = {"image_q": image_q, "image_k": image_k, "image_v": image_v}
        return self._decode(image_tokens, point_coords, point_labels, side)

    def _decode(self, image_tokens, point_coords, point_labels, image_side=None):
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
        # the positions' token layout is a constant of the exported graph
        masks, iou = self.mask_decoder(image_tokens, tokens_of(self.prompt_encoder.dense_pe()), sparse,
                                       self.grid, self.grid, image_side)
        return {"low_res_masks": masks, "iou_predictions": iou}

    def graph_modules(self) -> dict:
        """One module per GraphSpec role (the exporters' multi-graph protocol)."""
        return {"encoder": _Graph(self, "forward"), "decoder": _Graph(self, "decode_cached")}


class _Graph(nn.Module):
    def __init__(self, sam, method):
        super().__init__()
        self.sam, self.method = sam, method

    def forward(self, *inputs):
        return getattr(self.sam, self.method)(*inputs)


def build(variant: str):
    return Sam(**SIZES[variant])


def remap(raw):
    sd = strip_prefix(unwrap(raw), "module.")
    if not any(k.startswith(PREFIXES) for k in sd):
        conv3d = [k for k, v in sd.items() if getattr(v, "ndim", 0) == 5]
        what = (f"; its {len(conv3d)} 5-D weights (e.g. {conv3d[0]}) are 3-D convolutions: a volume model such as "
                "the MedLAM localiser, not SAM") if conv3d else ""
        raise CheckpointError(f"no segment_anything keys ({', '.join(PREFIXES)}) in this file; it has "
                              f"{len(sd)} tensors, e.g. {', '.join(sorted(sd)[:3])}{what}")
    return sd, {}


def _tensors():
    """Spatial sizes are None: the variant fixes them, the manifest records the real ones."""
    side = (TensorSpec("image_tokens", "NLC", shape=(1, None, None),
                       description="the embedding + no-mask embedding as tokens, the decoder's layout, once per image"),
            *(TensorSpec(f"image_{p}", "NLC", shape=(1, None, None),
                         description=f"first decoder block's {what} of the image tokens, once per image")
              for p, what in (("q", "image->token query projection"), ("k", "token->image key projection"),
                              ("v", "token->image value projection"))))
    return (
        (TensorSpec("pixel_values", "NCHW", shape=(1, 3, None, None),
                    description="RGB resized (longest side) and zero-padded, normalised"),
         TensorSpec("image_embeddings", "NCHW", shape=(1, None, None, None)), *side,
         TensorSpec("point_coords", "NLC", shape=(None, None, 2), dynamic={0: "prompts", 1: "points"},
                    description="x, y in the padded model frame; a box is 2 points"),
         TensorSpec("point_labels", "NL", shape=(None, None), dynamic={0: "prompts", 1: "points"},
                    description="0 negative, 1 positive, 2/3 box corners, -1 padding")),
        (TensorSpec("image_embeddings", "NCHW", shape=(1, None, None, None)), *side,
         TensorSpec("low_res_masks", "NCHW", shape=(None, 4, None, None), dynamic={0: "prompts"},
                    description="mask logits; 0 single-mask, 1..3 multimask"),
         TensorSpec("iou_predictions", "NC", shape=(None, 4), dynamic={0: "prompts"})))


SIDE = ("image_tokens", "image_q", "image_k", "image_v")
GRAPHS = (GraphSpec("encoder", ("pixel_values",), ("image_embeddings", *SIDE)),
          GraphSpec("decoder", (*SIDE, "point_coords", "point_labels"),
                    ("low_res_masks", "iou_predictions"), quantize="if-passes"))
PREPROCESS = {"color": "RGB", "grayscale": "replicate", "alpha": "drop", "resize": "longest_side",
              "interpolation": "bilinear", "pad": "bottom_right", "mean": SAM_MEAN, "std": SAM_STD,
              "range": "0-255", "mask_threshold": 0.0}
OFFICIAL = {"repo": "facebookresearch/segment-anything",
            "entry": "segment_anything/predictor.py (SamPredictor.set_image / predict); "
                     "utils/transforms.py (ResizeLongestSide); modeling/sam.py (preprocess, postprocess_masks)",
            "transform": "ResizeLongestSide(1024): PIL bilinear to round(side*scale) -> (x - mean) / std on 0-255 RGB "
                         "-> zero pad bottom/right to 1024",
            "post": "low-res 256 logits -> bilinear 1024 -> crop to the resized size -> bilinear to the input size "
                    "-> > 0"}


def _spec(model_id, title, source, licence, notes=""):
    inputs, outputs = _tensors()
    return ModelSpec(id=model_id, title=title, kind="promptable-segmentation", variants=("vit_b", "tiny"),
                     default_variant="vit_b", inputs=inputs, outputs=outputs, primary_output="low_res_masks",
                     preprocess=dict(PREPROCESS), licence=licence, source=source, build=build, remap=remap,
                     graphs=GRAPHS, official=OFFICIAL, notes=notes)


SPECS = [
    _spec("sam", "Segment Anything (SAM ViT-B), promptable 2-D segmentation",
          "https://github.com/facebookresearch/segment-anything", "Apache-2.0"),
    _spec("medsam", "MedSAM (SAM ViT-B fine-tuned on medical images), promptable 2-D segmentation",
          "https://github.com/bowang-lab/MedSAM", "Apache-2.0",
          notes="Preprocessed as SAM (longest side 1024, SAM mean/std), as MedLSAM feeds MedSAM; MedSAM_Inference.py's "
                "own square 1024 resize with [0,1] min-max scaling is not what this bundle does."),
]
