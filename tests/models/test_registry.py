"""Checkpoint loading: official layouts load strictly; wrong files fail clearly."""

import pytest
import torch
from safetensors.torch import save_file

import omedge.models as models
from omedge.errors import CheckpointError
from tests.conftest import official_state_dict


def _load(model_id, path, variant=None, trust=False):
    return models.load(models.get_spec(model_id), path, variant, trust=trust)


def test_brow_bare_state_dict_loads_strictly(ckpt_dir):
    model, variant, _ = _load("brow", ckpt_dir / "brow_tiny.pth")
    assert variant == "tiny"
    ref = torch.load(ckpt_dir / "brow_tiny.pth", weights_only=True)
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], ref["blocks.1.attn.qkv.weight"])
    assert model(torch.zeros(1, 3, 224, 224))["embedding"].shape == (1, 64)


def test_brow_dino_teacher_dict_with_head_is_accepted(tmp_path):
    sd = official_state_dict("brow")
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 64)
    torch.save({"teacher": teacher, "student": {}, "epoch": 3}, tmp_path / "dino.pth")
    model, _, _ = _load("brow", tmp_path / "dino.pth")
    assert torch.equal(model.cls_token, sd["cls_token"])


def test_pathoduet_he_drops_untrained_head(ckpt_dir):
    model, _, _ = _load("pathoduet-he", ckpt_dir / "checkpoint_HE.pth")
    assert model.head is None and hasattr(model, "pretext_token") and not hasattr(model, "norm")


def test_pathoduet_ihc_wrapped_with_bridge_token(ckpt_dir):
    model, _, _ = _load("pathoduet-ihc", ckpt_dir / "checkpoint_IHC.pth")
    assert model.pos_embed.shape == (1, 198, 64)


def test_pathoduet_raw_moco_training_file(tmp_path):
    sd = official_state_dict("pathoduet-he")
    raw = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    raw.update({f"module.momentum_encoder.{k}": v for k, v in sd.items()})
    raw["module.predictor.0.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": raw, "epoch": 100}, tmp_path / "moco.pth.tar")
    p = tmp_path / "moco.pth"
    (tmp_path / "moco.pth.tar").rename(p)
    model, _, _ = _load("pathoduet-he", p)
    assert torch.equal(model.pretext_token, sd["pretext_token"])


def test_pathoduet_pos_embed_prefix_rows_are_zero():
    m = models.build(models.get_spec("pathoduet-he"), "tiny")
    assert torch.count_nonzero(m.pos_embed[0, :2]) == 0 and torch.count_nonzero(m.pos_embed[0, 2:]) > 0


def test_deblurring_mae_training_dict_needs_only_allowlisted_globals(ckpt_dir):
    # {'model','optimizer','epoch','scaler','args': Namespace} loads without --trust-checkpoint
    model, _, options = _load("deblurring-mae", ckpt_dir / "checkpoint-799.pth")
    assert options == {} and model.head is None


def test_deblurring_finetuned_classifier_gets_its_head(ckpt_dir):
    model, _, options = _load("deblurring-mae", ckpt_dir / "finetuned_thyroid.pth")
    assert options == {"num_classes": 2}
    out = model(torch.zeros(2, 3, 224, 224))
    assert out["logits"].shape == (2, 2) and out["embedding"].shape == (2, 64)


def test_safetensors_accepted(tmp_path):
    save_file(official_state_dict("brow"), tmp_path / "brow.safetensors")
    assert _load("brow", tmp_path / "brow.safetensors")[1] == "tiny"


def test_wrong_model_says_which_model_it_looks_like(ckpt_dir):
    with pytest.raises(CheckpointError, match="looks like a 'pathoduet-(he|ihc)' checkpoint"):
        _load("brow", ckpt_dir / "checkpoint_HE.pth")


def test_wrong_variant_names_the_right_one(ckpt_dir):
    with pytest.raises(CheckpointError, match="(?s)variant 'tiny', not 'B'.*--variant tiny"):
        _load("brow", ckpt_dir / "brow_tiny.pth", variant="B")


def test_missing_keys_are_listed(tmp_path):
    sd = official_state_dict("brow")
    del sd["blocks.0.attn.qkv.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys.*blocks.0.attn.qkv.weight"):
        _load("brow", tmp_path / "partial.pth")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_refused_clearly(ckpt_dir, tmp_path, damage):
    data = (ckpt_dir / "brow_tiny.pth").read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 50,
                     "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt|truncated|empty|incomplete"):
        _load("brow", bad)


class Evil:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_unsafe_pickle_needs_explicit_trust(tmp_path):
    sd = official_state_dict("brow")
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match="(?s)refused: it contains code.*--trust-checkpoint"):
        _load("brow", path)
    with pytest.warns(UserWarning, match="full trust"):
        assert _load("brow", path, trust=True)[1] == "tiny"


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        _load("brow", path)


def test_registry_lists_issue_models():
    assert {"brow", "pathoduet-he", "pathoduet-ihc", "deblurring-mae"} <= set(models.all_specs())


@pytest.mark.parametrize("model_id,params", [("brow", 85.8e6), ("pathoduet-he", 85.8e6),
                                              ("deblurring-mae", 85.8e6)])
def test_full_size_parameter_counts(model_id, params):
    with torch.device("meta"):
        m = models.get_spec(model_id).build("B")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.01
