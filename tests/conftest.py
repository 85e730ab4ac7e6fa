"""Shared fixtures. Checkpoints are synthesised in the official layouts of MODELS.md
(same keys, nesting and shapes; random values). Sockets are blocked for every test:
omedge must never need the network."""
from __future__ import annotations

import argparse
import signal
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import omedge.models as models


def pytest_configure(config):
    """omedge's own per-user cache (the llama.cpp CPU variant verified per machine) lives
    in a fresh folder for the session, so tests see a first run, not a developer's cache."""
    import os
    import tempfile
    os.environ["OMEDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="omedge-test-cache-")
    # A shell that starts the run in the background (`cmd &` without job control) hands
    # every child SIGINT ignored, and an ignored signal survives exec: the Ctrl-C tests'
    # CLIs would never see their KeyboardInterrupt. Python's own handler here becomes the
    # default disposition in each exec'd child, as under an interactive shell.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError(f"network access attempted: {a}")))


def official_state_dict(model_id: str, variant: str = "tiny", seed: int = 0, **options) -> dict:
    """Random weights with exactly the key names and shapes of the released file."""
    spec = models.get_spec(model_id)
    sd = models.build(spec, variant, seed=seed, **options).state_dict()
    return {k: v.clone() for k, v in sd.items()}


def mae_training_dict(encoder_sd: dict, dim: int) -> dict:
    """DeblurringMIM / MAE `checkpoint-799.pth`: model (+decoder), optimizer, epoch,
    scaler, args (an argparse.Namespace)."""
    sd = dict(encoder_sd)
    sd.pop("norm.weight", None) if "fc_norm.weight" in sd else None
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder_embed.weight"] = torch.randn(32, dim)
    sd["decoder_embed.bias"] = torch.zeros(32)
    sd["decoder_pos_embed"] = torch.zeros(1, 197, 32)
    sd["decoder_blocks.0.norm1.weight"] = torch.ones(32)
    sd["decoder_norm.weight"] = torch.ones(32)
    sd["decoder_pred.weight"] = torch.randn(768, 32)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 799, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, blr=1.5e-4)}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """One tiny checkpoint per official layout."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.save(official_state_dict("brow"), d / "brow_tiny.pth")
    he = official_state_dict("pathoduet-he", seed=1)
    he["head.weight"], he["head.bias"] = torch.randn(1000, 64), torch.zeros(1000)  # class default, untrained
    torch.save(he, d / "checkpoint_HE.pth")
    ihc = official_state_dict("pathoduet-ihc", seed=2)
    ihc["bridge_token"] = torch.zeros(1, 1, 64)
    torch.save({"model": ihc}, d / "checkpoint_IHC.pth")
    enc = official_state_dict("deblurring-mae", seed=3)
    torch.save(mae_training_dict(enc, 64), d / "checkpoint-799.pth")
    cls = official_state_dict("deblurring-mae", seed=4, num_classes=2)
    torch.save({"model": cls}, d / "finetuned_thyroid.pth")
    return d


def write_tiles(folder, n, size=256, seed=0, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC).convert(mode)
        p = folder / f"tile_{i:03d}.png"
        img.save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiles(tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("tiles"), 40)


@pytest.fixture(scope="session")
def brow_bundle(tmp_path_factory, ckpt_dir, tiles):
    """A tiny BROW bundle with both formats at INT8, calibrated on a folder."""
    import omedge
    out = tmp_path_factory.mktemp("bundles") / "brow-int8.omedge"
    return omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["onnx", "openvino"], precision="int8",
                         calib=tiles[0].parent, out=out)


@pytest.fixture(scope="session")
def brow_fp32_bundle(tmp_path_factory, ckpt_dir):
    import omedge
    out = tmp_path_factory.mktemp("bundles") / "brow-fp32.omedge"
    return omedge.export("brow", ckpt_dir / "brow_tiny.pth", formats=["onnx", "openvino"], out=out)


def manifest_dict(bundle) -> dict:
    """A bundle's manifest as the plain JSON it is stored as (read through the checked,
    schema-validated reader)."""
    from omedge.manifest import read_manifest
    return read_manifest(bundle).to_dict()


def spec_io(spec, outputs=None) -> tuple[list[dict], list[dict]]:
    """The declared input and output tensors of a spec, as export_onnx takes them."""
    outs = [o.to_dict() for o in spec.outputs if outputs is None or o.name in outputs]
    return [i.to_dict() for i in spec.inputs], outs
