"""PULSE -> GGUF -> llama.cpp, on tiny BLOOM and Llama folders made in the test: real
gguf, llama.cpp quantizer and runtime, compared with transformers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the 'llm' extra) is needed for PULSE")
import gguf

import omedge
from omedge.errors import CheckpointError, InputError, ParityError, UsageError
from omedge.exporters import gguf as conv
from omedge.exporters.llm import export_llm
from tests.conftest import manifest_dict as read_manifest
from tests.pulse_folders import tiny_bloom, tiny_llama


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    return tiny_bloom(tmp_path_factory.mktemp("pulse") / "PULSE-7bv5-tiny")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("pulse") / "PULSE-20bv5-tiny")


@pytest.fixture(scope="module")
def q4_bundle(tmp_path_factory, bloom_dir):
    return export_llm("pulse", bloom_dir, quant="Q4_K_M", out=tmp_path_factory.mktemp("b") / "pulse-7b-q4")


def test_bloom_qkv_reorder_is_per_head_and_invertible():
    n_head, hd, emb = 4, 8, 32
    w = torch.arange(3 * emb * emb, dtype=torch.float32).reshape(3 * emb, emb).numpy()
    out = conv.bloom_qkv_to_gguf(w, n_head)
    # head h's q rows sit at [h*3*hd : h*3*hd+hd] in BLOOM; they must become Q rows h*hd..
    for h in range(n_head):
        np.testing.assert_array_equal(out[h * hd:(h + 1) * hd], w[h * 3 * hd:h * 3 * hd + hd])
        np.testing.assert_array_equal(out[emb + h * hd:emb + (h + 1) * hd], w[h * 3 * hd + hd:h * 3 * hd + 2 * hd])
    np.testing.assert_array_equal(conv.bloom_qkv_from_gguf(out, n_head), w)
    b = np.arange(3 * emb, dtype=np.float32)
    np.testing.assert_array_equal(conv.bloom_qkv_from_gguf(conv.bloom_qkv_to_gguf(b, n_head), n_head), b)


def test_llama_permute_round_trip():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    p = conv.llama_permute(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(conv.llama_unpermute(p, 4), w)


def test_q4_k_m_bundle(q4_bundle, bloom_dir):
    m = read_manifest(q4_bundle)
    art = m["artifacts"][0]
    assert art["precision"] == "Q4_K_M" and art["entry"] == "model-Q4_K_M.gguf"
    par = art["parity"]
    assert par["passed"] and par["gate"] == {"metric": "argmax agreement vs dequantized weights", "min": 0.95}
    assert par["vs_dequantized"]["argmax_agreement"] >= 0.95 and par["vs_dequantized"]["positions"] > 100
    assert par["tokenizer"]["passed"] and par["tokenizer"]["exact"] == par["tokenizer"]["texts"]
    assert set(m["files"]) == {"model-Q4_K_M.gguf", "manifest.json", "parity.npz"} - {"manifest.json"}
    assert "AGPL-3.0" in m["model"]["licence"] and m["model"]["id"] == "pulse-7b"
    reader = gguf.GGUFReader(q4_bundle / "model-Q4_K_M.gguf")
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" in types  # K-quants really exercised (rows are multiples of 256)
    fields = reader.fields
    text = lambda k: bytes(fields[k].parts[-1]).decode()
    assert "AGPL-3.0" in text("general.license") and text("general.architecture") == "bloom"
    assert "Helper: " in text("tokenizer.chat_template") and text("tokenizer.ggml.pre") == "bloom"


@pytest.mark.parametrize("quant,basis,gate", [("F16", "vs_original", 1.0), ("Q8_0", "vs_original", 0.99)])
def test_f16_and_q8_gates_against_the_original(tmp_path, bloom_dir, quant, basis, gate):
    b = export_llm("pulse-7b", bloom_dir, quant=quant, out=tmp_path / "b")
    par = read_manifest(b)["artifacts"][0]["parity"]
    assert par["passed"] and par[basis]["argmax_agreement"] >= gate
    assert par["vs_original"]["logit_max_abs"] < (0.05 if quant == "F16" else 0.5)


def test_llama_layout_20b_with_padded_sentencepiece_vocab(tmp_path, llama_dir):
    b = export_llm("pulse", llama_dir, quant="Q5_K_M", out=tmp_path / "b20", keep_f16=True)
    m = read_manifest(b)
    assert m["model"]["id"] == "pulse-20b" and m["extra"]["llm"]["arch"] == "llama"
    assert [a["precision"] for a in m["artifacts"]] == ["Q5_K_M", "F16"]
    par = m["artifacts"][0]["parity"]
    assert par["passed"] and par["tokenizer"]["passed"], par
    assert m["extra"]["conversion"]["vocab"] == 768 and m["extra"]["conversion"]["tokenizer_tokens"] == 768


def test_runtime_generate_chat_stream_describe(q4_bundle):
    p = omedge.load(q4_bundle)
    info = p.describe()
    assert info["backend"] == "llama.cpp" and info["device"] == "cpu" and info["n_gpu_layers"] == 0
    assert info["precision"] == "Q4_K_M"
    text = p.generate("头痛三天怎么办？", max_tokens=12, temperature=0)
    assert isinstance(text, str)
    pieces = list(p.generate("头痛三天怎么办？", max_tokens=12, stream=True, temperature=0))
    assert "".join(pieces).strip() == text  # streaming gives the same greedy answer
    history = [{"role": "user", "content": "What is hypertension?"}, {"role": "assistant", "content": text},
               {"role": "user", "content": "And its treatment?"}]
    assert isinstance(p.chat(history, max_tokens=8, mode="qa"), str)


def test_sampled_answers_follow_the_seed_streamed_or_not(q4_bundle):
    p = omedge.load(q4_bundle)
    hot = {"temperature": 1.2, "top_k": 0, "top_p": 1.0}
    a = p.generate("头痛三天怎么办？", max_tokens=16, seed=11, **hot)
    assert "".join(p.generate("头痛三天怎么办？", max_tokens=16, stream=True, seed=11, **hot)).strip() == a
    assert any(p.generate("头痛三天怎么办？", max_tokens=16, seed=s, **hot) != a for s in (12, 13, 14))
    with pytest.raises(InputError, match="temprature"):
        p.generate("头痛三天怎么办？", max_tokens=4, temprature=0)


def test_prompt_tokens_follow_the_official_demo(q4_bundle, bloom_dir):
    from transformers import AutoTokenizer
    p = omedge.load(q4_bundle)
    tok = AutoTokenizer.from_pretrained(bloom_dir)
    eos = tok.convert_tokens_to_ids("</s>")
    msgs = [{"role": "user", "content": "头痛三天怎么办？"}]
    expected = []
    for seg in [("Instructions: You are Helper, a large language model full of intelligence. Respond "
                 "conversationally."), "User: 头痛三天怎么办？"]:
        expected += tok(seg, add_special_tokens=False)["input_ids"] + [eos]
    expected += tok("Helper: ", add_special_tokens=False)["input_ids"][:1]
    assert p.prompt_tokens(msgs) == expected


def test_history_is_trimmed_and_too_long_prompt_refused(q4_bundle):
    p = omedge.load(q4_bundle)
    long_history = []
    for i in range(40):
        long_history += [{"role": "user", "content": f"Question {i} about chest pain and fever?"},
                         {"role": "assistant", "content": "Please see a doctor for an examination."}]
    long_history.append({"role": "user", "content": "Last question?"})
    assert len(p.prompt_tokens(long_history)) > p.n_ctx
    assert isinstance(p.chat(long_history, max_tokens=4, temperature=0), str)  # oldest turns dropped
    with pytest.raises(InputError, match="does not fit"):
        p.generate("胸痛 " * 2000, max_tokens=4)


def test_verify_reruns_llm_parity(q4_bundle):
    from omedge.verify import verify
    report = verify(q4_bundle)
    assert report["passed"] and report["runs"][0]["argmax_agreement"] >= 0.95


def test_bad_folders(tmp_path, bloom_dir):
    import shutil
    with pytest.raises(CheckpointError, match="no config.json"):
        export_llm("pulse", tmp_path, out=tmp_path / "x")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="supported: BloomForCausalLM"):
        export_llm("pulse", gpt2, out=tmp_path / "x")
    notok = tmp_path / "notok"
    shutil.copytree(bloom_dir, notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        export_llm("pulse", notok, out=tmp_path / "x")
    missing = tmp_path / "missing"
    shutil.copytree(bloom_dir, missing)
    next(missing.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002"):
        export_llm("pulse", missing, out=tmp_path / "x")
    trunc = tmp_path / "trunc"
    shutil.copytree(bloom_dir, trunc)
    shard = next(trunc.glob("model-00003-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        export_llm("pulse", trunc, out=tmp_path / "x")
    with pytest.raises(CheckpointError, match="pulse-7b, not pulse-20b"):
        export_llm("pulse-20b", bloom_dir, out=tmp_path / "x")
    with pytest.raises(UsageError, match="Q4_K_M"):
        export_llm("pulse", bloom_dir, quant="Q3_XS", out=tmp_path / "x")
    assert not (tmp_path / "x.omedge").exists()


def test_pytorch_bin_shards_convert(tmp_path):
    folder = tiny_bloom(tmp_path / "bin", safetensors=False)
    assert list(folder.glob("pytorch_model*.bin"))
    b = export_llm("pulse", folder, quant="Q8_0", out=tmp_path / "b")
    assert read_manifest(b)["artifacts"][0]["parity"]["passed"]


def test_not_enough_disk_and_interrupted_export_leave_nothing(tmp_path, bloom_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    from omedge.exporters import llm
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10**9, 10**9, 10))
    with pytest.raises(omedge.errors.ExportError, match="not enough disk space.*MB needed"):
        export_llm("pulse", bloom_dir, quant="Q4_K_M", out=tmp_path / "x")
    monkeypatch.setattr(shutil, "disk_usage", real)
    monkeypatch.setattr(llm, "quantize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_llm("pulse", bloom_dir, quant="Q4_K_M", out=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_is_refused(tmp_path, bloom_dir, monkeypatch):
    from omedge.exporters import llm
    monkeypatch.setitem(llm.GATES, "Q8_0", 1.01)
    with pytest.raises(ParityError, match="failed its parity gate"):
        export_llm("pulse", bloom_dir, quant="Q8_0", out=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_missing_llama_cpp_names_the_extra(q4_bundle):
    code = ("import sys; sys.modules['llama_cpp'] = None; import omedge\n"
            "from omedge.errors import BackendUnavailableError\n"
            "try:\n    omedge.load(sys.argv[1])\nexcept BackendUnavailableError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code, str(q4_bundle)], capture_output=True, text=True,
                       check=False)
    assert "omedge[llm]" in r.stdout, r.stdout + r.stderr[-2000:]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "omedge.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, **kw)


def test_cli_export_predict_chat(tmp_path, bloom_dir):
    r = cli("export", "pulse", "--weights", bloom_dir, "--int4", "-o", tmp_path / "pulse-7b-q4.omedge")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "argmax agreement" in r.stdout and "tokenizer round trip" in r.stdout
    b = tmp_path / "pulse-7b-q4.omedge"
    r = cli("predict", b, "头痛三天怎么办？", "--json", "--max-tokens", "8")
    data = json.loads(r.stdout)
    assert data["results"][0]["prompt"] == "头痛三天怎么办？" and data["runtime"]["backend"] == "llama.cpp"
    r = cli("chat", b, "--max-tokens", "6", input="What is a fever?\n/clear\nAnd a cough?\n")
    assert r.returncode == 0 and r.stdout.count("Helper: ") == 2, r.stderr[-2000:]
    r = cli("verify", b)
    assert r.returncode == 0 and "argmax agreement" in r.stdout
    r = cli("export", "pulse", "--weights", tmp_path / "nope", "-o", tmp_path / "x")
    assert r.returncode == 3 and "not a folder" in r.stderr


def test_devices_warns_about_a_native_amx_build(monkeypatch):
    import omedge.runtime.backends.llama as backend
    with monkeypatch.context() as m:
        m.setattr(backend, "cpu_variants", list)  # a static (native) build, whatever is installed
        m.setattr(backend, "system_info", lambda: "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | OPENMP = 1")
        assert "SIGILL" in backend.amx_risk() and "GGML_NATIVE=OFF" in backend.amx_risk()
        m.setattr(backend, "system_info", lambda: "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1")
        assert backend.amx_risk() is None
    real = backend.LlamaCppBackend.probe()  # the installed build, read for real
    assert real["devices"]["cpu"] is None and real["installed"]
