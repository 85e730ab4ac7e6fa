"""PRIME bundles end to end through the CLI: official-layout files in, INT8 with FASTA
calibration, mutation scores and OGT out, and every bad input named clearly."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import omedge
from omedge.errors import InputError
from tests.conftest import manifest_dict
from tests.models.test_prime import synth_official

WT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAA".replace("U", "")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "omedge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prime")
    torch.save(synth_official("lm", seed=3), d / "prime.pt")
    torch.save(synth_official("ogt", seed=4), d / "prime_ogt.pt")
    rng = np.random.default_rng(0)
    records = ["".join(rng.choice(list("LAGVSERTIDPKQNFYMHWC"), int(rng.integers(60, 200)))) for _ in range(12)]
    (d / "proteins.fasta").write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(records)))
    (d / "wt.fasta").write_text(f">wt\n{WT}\n")
    muts = [f"{WT[i]}{i + 1}{a}" for i in range(0, len(WT), 7) for a in "AGW" if a != WT[i]]
    (d / "muts.csv").write_text("mutant,DMS_score\n" + "".join(f"{m},{k * 0.1:.1f}\n" for k, m in enumerate(muts)))
    return d


@pytest.fixture(scope="module")
def int8_bundle(files):
    out = files / "prime-int8.omedge"
    r = cli("export", "prime", "--weights", files / "prime.pt", "--format", "onnx,openvino", "--int8",
            "--calib", files / "proteins.fasta", "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_int8_export_records_spearman_and_logprob_error(int8_bundle):
    m = manifest_dict(int8_bundle)
    assert m["model"]["kind"] == "sequence" and m["inputs"][0]["dtype"] == "int64"
    assert m["inputs"][0]["dynamic"] == {"0": "batch", "1": "length"}
    assert m["calibration"]["source"] == "folder" and m["calibration"]["samples"] >= 8
    for art in m["artifacts"]:
        lp = art["parity"]["outputs"]["log_probs"]
        assert art["parity"]["passed"] and lp["spearman_min"] >= 0.99 and lp["logprob_max_abs_error"] < 1.0
        assert art["parity"]["gates"]["spearman_min"] == 0.99


def test_predict_scores_every_mutant(int8_bundle, files):
    r = cli("predict", int8_bundle, "--sequence", files / "wt.fasta", "--mutations", files / "muts.csv", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["results"]
    n = len((files / "muts.csv").read_text().splitlines()) - 1
    assert len(rows) == n and all(np.isfinite(x["score"]) and x["wild_type_check"] == "ok" for x in rows)
    assert rows[0]["DMS_score"] == "0.0" and rows[0]["positions"] == [1]


def test_scores_equal_torch_zero_shot(int8_bundle, files):
    """The bundle's fp32-equivalent path: scores from ONNX fp32 equal torch's official formula."""
    from omedge.models import get_spec, load
    b = omedge.export("prime", files / "prime.pt", out=files / "prime-fp32")
    model = load(get_spec("prime"), files / "prime.pt")[0]
    from omedge.io.protein import encode
    with torch.no_grad():
        lp = model(torch.from_numpy(encode(WT)[None]))["log_probs"][0].numpy()
    want = lp[5, 5] - lp[5, encode(WT)[5]]  # residue 5 is token row 5 (row 0 is cls); A is id 5
    got = omedge.load(b).score(WT, [f"{WT[4]}5A"])[0]["score"]
    assert abs(got - want) < 1e-4


def test_ogt_degrees_per_sequence(files):
    out = files / "prime-ogt.omedge"
    r = cli("export", "prime-ogt", "--weights", files / "prime_ogt.pt", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("predict", out, "--sequence", files / "proteins.fasta", "--json")
    rows = json.loads(r.stdout)["results"]
    assert len(rows) == 12 and all(np.isfinite(x["ogt_c"]) for x in rows)
    par = manifest_dict(out)["artifacts"][0]["parity"]["outputs"]["ogt"]
    assert par["abs_error_max_c"] <= 0.05


def test_bad_inputs_are_named(int8_bundle, files):
    p = omedge.load(int8_bundle)
    (files / "empty.fasta").write_text("")
    (files / "bad.fasta").write_text(">x\nMKTJAY\n")
    with pytest.raises(InputError, match="no record|no sequence|empty"):
        p.score(files / "empty.fasta", ["K2A"])
    with pytest.raises(InputError, match="J"):
        p.score(str(files / "bad.fasta"), ["K2A"])
    with pytest.raises(InputError, match=r"A2G.*K.*not A|position 2 is K"):
        p.score(WT, ["A2G"])
    with pytest.raises(InputError, match="out of range|outside|length"):
        p.score(WT, [f"A{len(WT) + 5}G"])
    with pytest.raises(InputError, match="residues; one pass takes"):
        p.log_probs("A" * 5000)
    r = cli("predict", int8_bundle, "--sequence", files / "wt.fasta", "--mutations", "A2G")
    assert r.returncode == 6 and "Traceback" not in r.stderr and "A2G" in r.stderr


def test_long_sequences_are_cropped_to_the_window_of_the_mutations(int8_bundle):
    p = omedge.load(int8_bundle)
    rng = np.random.default_rng(1)
    long = "".join(rng.choice(list("LAGVSERTIDPKQNFYMHWC"), 5000))
    rows = p.score(long, [f"{long[4500]}4501A", f"{long[4800]}4801G"])
    assert len(rows) == 2 and all(np.isfinite(r["score"]) for r in rows)
