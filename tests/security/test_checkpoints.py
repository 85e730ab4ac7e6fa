"""Hostile checkpoint and plans files (issue #12 items 15, 18, 19): code-carrying
pickles are refused as code, not as corruption; numpy values are rebuilt from raw
bytes, so a forged array state cannot crash the process; damaged nnU-Net plans are a
CheckpointError that names the problem."""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from omedge.errors import CheckpointError
from omedge.models.checkpoint import read_checkpoint
from omedge.models.nnunet_plans import preprocess_from_plans, read_plans


class _Calls:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Plain:  # an arbitrary class: building it needs its module imported
    pass


class _ForgedArray:
    """Pickles as numpy's own array reduction, but with an object dtype over raw bytes:
    numpy's reconstructor would give an array of wild pointers."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), np.dtype("O"), False, b"A" * 16)


def _replace_pickle(path, payload: bytes):
    """A valid torch zip file whose data.pkl is `payload`."""
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[next(n for n in members if n.endswith("data.pkl"))] = payload
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


CODE_CARRYING = {
    "os.system": lambda p: torch.save({"a": _Calls(os.system, "true")}, p),
    "eval": lambda p: torch.save({"a": _Calls(eval, "1")}, p),
    "exec": lambda p: torch.save({"a": _Calls(exec, "x=1")}, p),
    "subprocess": lambda p: torch.save({"a": _Calls(subprocess.call, ["true"])}, p),
    "getattr": lambda p: torch.save({"a": _Calls(getattr, _Plain, "__init__")}, p),
    "import": lambda p: torch.save({"a": _Calls(__import__, "os")}, p),
    "class": lambda p: torch.save({"a": _Plain()}, p),
    "legacy format": lambda p: torch.save({"a": _Calls(os.system, "true")}, p, _use_new_zipfile_serialization=False),
    "protocol 1": lambda p: torch.save({"a": _Calls(os.system, "true")}, p, pickle_protocol=1),
    "OBJ opcode": lambda p: _replace_pickle(p, b"(cos\nsystem\nS'true'\no."),
    "INST opcode": lambda p: _replace_pickle(p, b"(S'true'\nios\nsystem\n."),
    "STACK_GLOBAL": lambda p: _replace_pickle(p, pickle.dumps(os.system, protocol=4)),
    "forged ndarray": lambda p: torch.save({"a": _ForgedArray()}, p),
    "nested in a state_dict": lambda p: torch.save({"state_dict": {"w": torch.zeros(1), "x": _Calls(print, "x")}}, p),
}


@pytest.mark.parametrize("case", sorted(CODE_CARRYING))
def test_a_code_carrying_checkpoint_is_refused_as_code(case, tmp_path):
    path = tmp_path / "model.pth"
    CODE_CARRYING[case](path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    text = str(err.value)
    assert "corrupt" not in text
    assert "--trust-checkpoint" in text and ("code" in text or "numpy value" in text)


def test_a_damaged_file_is_still_called_damaged(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        read_checkpoint(path)


def test_a_forged_array_cannot_crash_the_process(tmp_path):
    """The forged state is refused before numpy sees it: printing what loads must not
    kill the interpreter (it would, with numpy's reconstructor allow-listed)."""
    path = tmp_path / "forged.pth"
    torch.save({"plot_stuff": [_ForgedArray()]}, path)
    code = ("import sys; from omedge.models.checkpoint import read_checkpoint\n"
            "from omedge.errors import CheckpointError\n"
            f"try:\n    print(repr(read_checkpoint({str(path)!r})))\n"
            "except CheckpointError as e:\n    print('refused:', e); sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, (run.returncode, run.stdout, run.stderr[-500:])
    assert "forged or unsupported numpy value" in run.stdout


def test_plain_numpy_values_load_as_real_arrays(tmp_path):
    """What official files hold (nnU-Net plot_stuff, MAE args) still loads, as numpy."""
    path = tmp_path / "nnunet.model"
    array = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2].copy(order="F")
    torch.save({"state_dict": {"w": torch.ones(2)}, "plot_stuff": ([np.float64(0.5)], [np.float32(1.5)]),
                "args": argparse.Namespace(lr=np.float64(1e-4), sizes=array)}, path)
    obj = read_checkpoint(path)
    assert obj["plot_stuff"][0][0] == 0.5 and isinstance(obj["plot_stuff"][1][0], np.float32)
    got = obj["args"].sizes
    assert isinstance(got, np.ndarray) and got.dtype == np.dtype(">i4")
    np.testing.assert_array_equal(got, array)


def _plans(**stage_changes):
    stage = {"current_spacing": np.array([1.5, 1.5, 1.5]), "patch_size": np.array([128, 128, 128]),
             "pool_op_kernel_sizes": [[2, 2, 2]] * 4}
    stage.update(stage_changes)
    return {"plans_per_stage": {0: stage}, "normalization_schemes": {0: "CT"},
            "dataset_properties": {"intensityproperties": {0: {"percentile_00_5": -1000.0, "percentile_99_5": 1000.0,
                                                               "mean": 50.0, "sd": 200.0}}}}


def test_official_plans_pickle_reads(tmp_path):
    path = tmp_path / "model_final_checkpoint.model.pkl"
    path.write_bytes(pickle.dumps({"plans": _plans(), "init": (1, 2)}, protocol=2))
    pre = preprocess_from_plans(read_plans(path))
    assert pre["target_spacing"] == [1.5, 1.5, 1.5] and pre["normalization"] == "ct_window"


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.pop("plans_per_stage"), "no plans_per_stage"),
    (lambda p: p["plans_per_stage"][0].pop("patch_size"), "KeyError"),
    (lambda p: p["plans_per_stage"][0].update(current_spacing="1.5mm"), "ValueError"),
    (lambda p: p["plans_per_stage"][0].update(current_spacing=None), "TypeError"),
    (lambda p: p["plans_per_stage"][0].update(current_spacing=[100.0, 100.0, 1e-5]), "implausible spacing"),
    (lambda p: p["plans_per_stage"][0].update(patch_size=[128, -1, 128]), "implausible patch size"),
    (lambda p: p["dataset_properties"].update(intensityproperties=[]), "IndexError"),
])
def test_damaged_plans_are_a_checkpoint_error(damage, message, tmp_path):
    plans = _plans()
    damage(plans)
    path = tmp_path / "plans.pkl"
    path.write_bytes(pickle.dumps({"plans": plans}))
    with pytest.raises(CheckpointError, match=message):
        preprocess_from_plans(read_plans(path))


def test_a_plans_pickle_carrying_code_is_refused(tmp_path):
    path = tmp_path / "plans.pkl"
    path.write_bytes(pickle.dumps({"plans": _Calls(os.system, "true")}))
    with pytest.raises(CheckpointError, match="not plain data"):
        read_plans(path)


def test_numpy_1_and_numpy_2_names_both_read(tmp_path):
    """nnU-Net releases were pickled under numpy 1 (`numpy.core.multiarray`); numpy 2
    writes `numpy._core.multiarray`. Both names map to the same stand-ins."""
    value = {"plans": {"spacing": np.array([1.5, 0.8, 0.8]), "n": np.int64(3)}}
    raw = pickle.dumps(value, protocol=2)
    assert b"numpy._core.multiarray" in raw
    for name, data in (("numpy2", raw), ("numpy1", raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        got = read_plans(path)
        np.testing.assert_array_equal(got["spacing"], [1.5, 0.8, 0.8])
        assert got["n"] == 3
