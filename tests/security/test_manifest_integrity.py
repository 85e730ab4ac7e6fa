"""The manifest contract (issue #12 items 1-4, 11, 20): schema-checked, hash-checked
and (where the site trusts keys) signature-checked on every read; nothing outside the
bundle is opened; the parity record cannot be switched off; a bundle of the previous
schema is refused with a clear message."""
import json
import shutil

import numpy as np
import pytest

import omedge
from omedge.bundle import bundle_file
from omedge.errors import BundleIntegrityError
from omedge.manifest import MANIFEST_HASH, SCHEMA, canonical_hash, read_manifest, schema_errors


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return omedge.export("brow", variant="tiny", random_weights=True,
                         out=tmp_path_factory.mktemp("m") / "brow.omedge")


def _rewrite(src, dst, edit, rehash=True):
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data = edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    if rehash and isinstance(data, dict):
        (dst / MANIFEST_HASH).write_text(canonical_hash(data))
    return dst


def test_facts_come_from_the_spec(bundle):
    m = read_manifest(bundle)
    assert m.kind == "image" and m.inputs[0]["layout"] == "NCHW" and m.primary_output == "embedding"
    assert [o["name"] for o in m.outputs] == ["embedding"] and m.inputs[0]["dynamic"] == {"0": "batch"}
    assert not schema_errors(m.to_dict(), SCHEMA)
    # every preprocessing choice names the official code it reproduces
    assert m.preprocess["official"]["repo"] == "openmedlab/BROW" and "extract_features.py" in m.preprocess[
        "official"]["entry"] and m.preprocess["alpha"] == "drop"


def test_an_edited_manifest_is_refused(bundle, tmp_path):
    def loosen(d):
        d["preprocess"]["mean"] = [0, 0, 0]
        return d
    b = _rewrite(bundle, tmp_path / "b.omedge", loosen, rehash=False)
    with pytest.raises(BundleIntegrityError, match="modified after export"):
        omedge.load(b)


@pytest.mark.parametrize("edit, message", [
    (lambda d: [d], "not a JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "artifacts"}, "missing 'artifacts'"),
    (lambda d: {**d, "files": list(d["files"])}, "files: expected object"),
    (lambda d: {**d, "inputs": [{"name": "x"}]}, "missing 'layout'"),
])
def test_a_manifest_that_fails_its_schema_is_refused(bundle, tmp_path, edit, message):
    b = _rewrite(bundle, tmp_path / "b.omedge", edit)
    with pytest.raises(BundleIntegrityError, match=message):
        omedge.load(b)


def test_deeply_nested_json_is_a_clear_error(bundle, tmp_path):
    b = tmp_path / "deep.omedge"
    shutil.copytree(bundle, b)
    (b / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(BundleIntegrityError, match="damaged"):
        omedge.load(b)


def test_the_previous_schema_asks_for_a_re_export(bundle, tmp_path):
    b = _rewrite(bundle, tmp_path / "old.omedge", lambda d: {**d, "schema_version": 1})
    with pytest.raises(BundleIntegrityError, match="schema version 1.*re-export|re-export"):
        omedge.load(b)


@pytest.mark.parametrize("entry", ["../other.omedge/model.onnx", "/etc/passwd", "notes.txt"])
def test_an_entry_outside_the_listed_files_is_refused(bundle, tmp_path, entry):
    def point(d):
        d["artifacts"][0]["entry"] = entry
        return d
    b = _rewrite(bundle, tmp_path / "b.omedge", point)
    (b / "notes.txt").write_text("not listed")
    with pytest.raises(BundleIntegrityError, match="outside itself|does not list"):
        omedge.load(b)


def test_bundle_paths_are_confined(bundle):
    m = read_manifest(bundle)
    assert bundle_file(bundle, "model.onnx", m) == bundle / "model.onnx"
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(BundleIntegrityError):
            bundle_file(bundle, bad, m)


# -- issue #12 item 1: a rehashed manifest with other preprocessing; site signatures --------
def _image_bundle(tmp_path_factory):
    return omedge.export("brow", variant="tiny", random_weights=True, formats=["onnx"],
                         out=tmp_path_factory.mktemp("raw") / "brow.omedge")


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    return _image_bundle(tmp_path_factory)


def test_verify_runs_the_stored_preprocessing_on_raw_pictures(onnx_bundle, tmp_path):
    """The attacker recomputes manifest.sha256 after changing mean/std: the stored
    tensors still match, but the raw pictures through the new preprocessing do not."""
    from omedge.verify import verify
    assert verify(onnx_bundle)["passed"]

    def shift(d):
        d["preprocess"]["mean"] = [m + 0.1 for m in d["preprocess"]["mean"]]
        return d
    b = _rewrite(onnx_bundle, tmp_path / "b.omedge", shift)
    report = verify(b)
    assert not report["passed"]
    assert all("raw pictures through the manifest's preprocessing" in r["result"] for r in report["runs"])


@pytest.fixture()
def site_key(tmp_path, monkeypatch):
    from omedge.signing import generate_key
    key, pub = generate_key(tmp_path / "site")
    return key, pub


def test_a_signed_bundle_loads_where_the_site_trusts_its_key(onnx_bundle, tmp_path, site_key, monkeypatch):
    from omedge.signing import sign_bundle
    key, pub = site_key
    b = tmp_path / "signed.omedge"
    shutil.copytree(onnx_bundle, b)
    kid = sign_bundle(b, key)
    monkeypatch.setenv("OMEDGE_TRUSTED_KEYS", str(pub))
    p = omedge.load(b)
    assert p.describe()["signature"] == {"signed_by": kid, "checked": True}
    assert (key.stat().st_mode & 0o777) == 0o600


def test_unsigned_forged_and_foreign_bundles_are_refused(onnx_bundle, tmp_path, site_key, monkeypatch):
    from omedge.signing import generate_key, sign_bundle
    key, pub = site_key
    monkeypatch.setenv("OMEDGE_TRUSTED_KEYS", str(pub))
    with pytest.raises(BundleIntegrityError, match="not signed"):
        omedge.load(onnx_bundle)
    # signed, then the manifest changed and rehashed: the signature no longer matches
    b = tmp_path / "b.omedge"
    shutil.copytree(onnx_bundle, b)
    sign_bundle(b, key)
    data = json.loads((b / "manifest.json").read_text())
    data["preprocess"]["std"] = [1.0, 1.0, 1.0]
    (b / "manifest.json").write_text(json.dumps(data))
    (b / MANIFEST_HASH).write_text(canonical_hash(data))
    with pytest.raises(BundleIntegrityError, match="another manifest"):
        omedge.load(b)
    # the attacker re-signs with their own key
    other, _ = generate_key(tmp_path / "attacker")
    sign_bundle(b, other)
    with pytest.raises(BundleIntegrityError, match="does not trust"):
        omedge.load(b)
    # a signature record copied over with the right hash but a forged signature
    sig = json.loads((b / "manifest.sig").read_text())
    sign_bundle(b, key)
    good = json.loads((b / "manifest.sig").read_text())
    (b / "manifest.sig").write_text(json.dumps({**good, "signature": sig["signature"]}))
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        omedge.load(b)


def test_without_trusted_keys_a_signature_is_reported_not_checked(onnx_bundle, tmp_path, site_key, monkeypatch):
    from omedge.signing import sign_bundle
    monkeypatch.delenv("OMEDGE_TRUSTED_KEYS", raising=False)
    b = tmp_path / "b.omedge"
    shutil.copytree(onnx_bundle, b)
    kid = sign_bundle(b, site_key[0])
    assert omedge.load(b).describe()["signature"] == {"signed_by": kid, "checked": False}


# -- item 3: the parity guarantee cannot be switched off ---------------------------------------
def _forced_failing_bundle(tmp_path):
    """An fp32 bundle whose only artifact's parity record says it failed (as --force writes)."""
    b = omedge.export("brow", variant="tiny", random_weights=True, formats=["onnx"], out=tmp_path / "f.omedge")

    def fail(d):
        art = d["artifacts"][0]
        art["parity"]["passed"] = False
        for rec in art["parity"].get("backends", {}).values():
            rec["passed"] = False
        art["verified_backends"] = []
        return d
    return _rewrite(b, tmp_path / "failed.omedge", fail)


@pytest.mark.parametrize("tamper", ["delete verified_backends", "add the failed backend"])
def test_a_failed_artifact_never_runs(tmp_path, tamper):
    failed = _forced_failing_bundle(tmp_path)

    def edit(d):
        art = d["artifacts"][0]
        if tamper == "delete verified_backends":
            art.pop("verified_backends", None)
        else:
            art["verified_backends"] = ["onnxruntime"]
        return d
    b = _rewrite(failed, tmp_path / "t.omedge", edit)
    with pytest.raises((BundleIntegrityError, omedge.errors.BackendUnavailableError)) as err:
        omedge.load(b, backend="onnxruntime", device="cpu")
    assert "parity" in str(err.value) or "verified" in str(err.value) or "missing" in str(err.value)


# -- item 4: nothing outside the bundle is opened or hashed ------------------------------------
@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_files_entries_outside_the_bundle_are_refused_before_hashing(onnx_bundle, tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"secret")

    def add(d):
        d["files"][name] = {"sha256": "0" * 64, "bytes": 6}
        return d
    b = _rewrite(onnx_bundle, tmp_path / "b.omedge", add)
    with pytest.raises(BundleIntegrityError, match="outside itself"):
        omedge.load(b)


def test_a_symlink_inside_the_bundle_is_refused(onnx_bundle, tmp_path):
    b = tmp_path / "b.omedge"
    shutil.copytree(onnx_bundle, b)
    real = tmp_path / "elsewhere.onnx"
    (b / "model.onnx").rename(real)
    (b / "model.onnx").symlink_to(real)
    with pytest.raises(BundleIntegrityError, match="symbolic link"):
        omedge.load(b)


def test_a_verification_file_outside_the_bundle_is_refused(onnx_bundle, tmp_path):
    from omedge.verify import verify
    shutil.copy(onnx_bundle / "parity.npz", tmp_path / "other.npz")

    def point(d):
        d["verification"]["file"] = "../other.npz"
        return d
    b = _rewrite(onnx_bundle, tmp_path / "b.omedge", point)
    with pytest.raises(BundleIntegrityError, match="outside itself"):
        verify(b)


# -- item 11: a manifest whose input name is not the graph's ------------------------------------
def test_a_wrong_input_name_is_a_typed_error(onnx_bundle, tmp_path):
    def rename(d):
        d["inputs"][0]["name"] = "bogus"
        d["artifacts"][0]["inputs"] = ["bogus"]
        return d
    b = _rewrite(onnx_bundle, tmp_path / "b.omedge", rename)
    with pytest.raises(omedge.errors.OmedgeError, match="bogus"):
        omedge.load(b).predict(np.zeros((256, 256, 3), np.uint8))


# -- item 20: parity names zero-norm and NaN outputs ---------------------------------------------
def test_parity_names_zeros_nan_and_inf():
    from omedge.parity import TENSOR_GATES, compare
    ref = {"embedding": np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)}
    zeros = compare(ref, {"embedding": np.zeros((4, 16), np.float32)}, TENSOR_GATES["fp32"])
    assert zeros["failures"] and "cosine" in zeros["failures"][0]
    bad = ref["embedding"].copy()
    bad[0, 0], bad[1, 1] = np.nan, np.inf
    nan = compare(ref, {"embedding": bad}, TENSOR_GATES["fp32"])
    assert nan["failures"] and "NaN/Inf" in nan["failures"][0] and "1.000000" not in nan["failures"][0]


def test_keygen_sign_and_verify_from_the_command_line(onnx_bundle, tmp_path, monkeypatch, capsys):
    from omedge.cli import main
    b = tmp_path / "b.omedge"
    shutil.copytree(onnx_bundle, b)
    assert main(["keygen", "-o", str(tmp_path / "site")]) == 0
    assert main(["keygen", "-o", str(tmp_path / "site")]) == 2  # never overwrites a key
    assert main(["sign", str(b), "--key", str(tmp_path / "site.key")]) == 0
    monkeypatch.setenv("OMEDGE_TRUSTED_KEYS", str(tmp_path))
    capsys.readouterr()
    assert main(["verify", str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signature"]["checked"] is True
    assert main(["verify", str(onnx_bundle)]) == 8  # unsigned: refused, exit code of BundleIntegrityError
