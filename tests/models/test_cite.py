"""CITE: strict loading of the official mmcls file, the official forward (written here from
the official code's semantics: OpenAI CLIP's LND nn.MultiheadAttention blocks), class
texts from the saved config, and the text folder checks."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
from cite_data import TEXTS, official_state, write_bert_folder, write_cite_checkpoint  # noqa: E402

from omedge.errors import CheckpointError, UsageError  # noqa: E402
from omedge.models import get_spec, load  # noqa: E402
from omedge.models.checkpoint import read_checkpoint  # noqa: E402
from omedge.models.cite import class_texts, remap  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_bert_folder(tmp_path_factory.mktemp("bert") / "tiny-bert")


def official_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """PromptedCLIPImageBackbone.forward + ProjectionNeck in fp32, from the CLIP names."""
    sd = {k: v.float() for k, v in sd.items()}
    m = "backbone.model."
    x = F.conv2d(x, sd[m + "conv1.weight"], stride=16).flatten(2).permute(0, 2, 1)
    x = torch.cat([sd[m + "class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1]), x], 1)
    x = x + sd[m + "positional_embedding"]
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), sd[m + "ln_pre.weight"], sd[m + "ln_pre.bias"]).permute(1, 0, 2)
    prompt = sd["backbone.prompt"].unsqueeze(2).expand(-1, -1, x.shape[1], -1)
    x = torch.cat([x[:1], prompt[0], x[1:]], 0)
    i = 0
    while f"{m}transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"{m}transformer.resblocks.{i}."
        x = torch.cat([x[:1], prompt[0], x[2:]], 0) if i == 0 else x  # prompt_layers=[0] re-insert
        h = F.layer_norm(x, (d,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        att, _ = F.multi_head_attention_forward(h, h, h, d, heads, sd[b + "attn.in_proj_weight"],
                                                sd[b + "attn.in_proj_bias"], None, None, False, 0.0,
                                                sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"],
                                                need_weights=False)
        x = x + att
        h = F.layer_norm(x, (d,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        i += 1
    x = x.permute(1, 0, 2)
    x = F.layer_norm(x[:, 0], (d,), sd[m + "ln_post.weight"], sd[m + "ln_post.bias"]) @ sd[m + "proj"]
    return F.linear(x, sd["neck.weight"], sd["neck.bias"])


def test_official_file_loads_strictly_and_matches_the_official_forward(tmp_path, bert):
    ckpt = write_cite_checkpoint(tmp_path / "cite.pth", "tiny", seed=3)
    raw = read_checkpoint(ckpt)  # weights_only: meta / optimizer are plain types
    assert set(raw) == {"meta", "state_dict", "optimizer"}
    assert raw["state_dict"]["neck.weight"].dtype == torch.float16
    assert raw["state_dict"]["backbone.model.ln_pre.weight"].dtype == torch.float32
    model, variant, options = load(get_spec("cite"), ckpt, text_encoder=str(bert))
    assert variant == "tiny" and options["class_texts"] == TEXTS and options["n_classes"] == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
        want = official_forward(raw["state_dict"], x, heads=2)
    torch.testing.assert_close(ours["embedding"], want, rtol=1e-4, atol=1e-4)
    # the head: 100 * cosine against the class embeddings made from the text folder (fp16-rounded)
    emb = model.class_embeddings
    assert emb.shape == (3, 64) and torch.equal(emb, emb.half().float())
    cos = F.normalize(want, dim=-1) @ F.normalize(emb, dim=-1).t()
    torch.testing.assert_close(ours["logits"], 100 * cos, rtol=1e-4, atol=1e-3)


def test_full_size_layout_is_the_official_one():
    sd = official_state("B")
    assert len(sd) == 155 and next(iter(sd)) == "backbone.prompt"
    assert abs(sum(v.numel() for v in sd.values()) / 1e6 - 86.7) < 0.1
    ours, options = remap({"meta": {}, "state_dict": sd})
    with torch.device("meta"):
        model = get_spec("cite").build("B", **options)
    model.load_state_dict(ours, strict=True, assign=True)
    assert options["text_dim"] == 1024 and options["class_texts"] == TEXTS


def test_class_texts_come_from_the_saved_config(tmp_path):
    custom = ["intestinal metaplasia", "signet ring cell carcinoma"]
    raw = read_checkpoint(write_cite_checkpoint(tmp_path / "c.pth", texts=custom))
    assert raw["meta"]["CLASSES"] == ["0", "1"]
    assert class_texts(raw) == (custom, 2)
    bare = read_checkpoint(write_cite_checkpoint(tmp_path / "b.pth", config=False))
    assert class_texts(bare) == (TEXTS, 3)  # no config: the official texts, for the official 3 classes


def test_wrong_files_and_folders_are_refused(tmp_path, bert):
    sam_like = {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}
    with pytest.raises(CheckpointError, match="not a CITE file"):
        remap(sam_like)
    ckpt = write_cite_checkpoint(tmp_path / "cite.pth")
    spec = get_spec("cite")
    with pytest.raises(UsageError, match="--text-encoder"):
        load(spec, ckpt)[0].graph_modules()
    roberta = write_bert_folder(tmp_path / "roberta", model_type="roberta")
    with pytest.raises(UsageError, match="not a BERT-like folder"):
        load(spec, ckpt, text_encoder=str(roberta))[0].graph_modules()
    with pytest.raises(UsageError, match="no config.json"):
        load(spec, ckpt, text_encoder=str(tmp_path))[0].graph_modules()
    with pytest.raises(UsageError, match="trained for 3 classes"):
        load(spec, ckpt, text_encoder=str(bert), class_texts=["a", "b"])
