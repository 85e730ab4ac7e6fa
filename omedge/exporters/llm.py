"""PULSE: HF folder -> F16 GGUF -> llama.cpp quantization -> parity vs transformers -> bundle.

Parity is measured on a fixed set of Chinese and English medical prompts in PULSE's
own format: next-token logits at every prompt position, the same token ids fed to both
sides (tokenizer agreement is checked on its own)."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import BundleWriter, bundle_path
from ..errors import ParityError, UsageError
from ..manifest import Artifact, Manifest
from ..models import get_spec
from ..models.pulse import LICENCE, PRIMER, PROMPT, SAMPLING, SOURCE, inspect_folder, prompt_segments
from ..quantize.gguf_quant import BITS_PER_WEIGHT, QUANTS, quantize
from . import gguf as gguf_convert

PROMPTS = [
    "头痛三天怎么办？",
    "患者男，65岁，反复胸闷气短两周，活动后加重，既往高血压病史十年。",
    "What are the first-line treatments for community-acquired pneumonia in adults?",
    "糖尿病患者的饮食需要注意什么？",
    "A 30-year-old woman has a painless thyroid nodule of 1.5 cm. What is the next step?",
    "儿童发烧38.5度，精神尚可，需要去医院吗？",
]
ROUND_TRIP_TEXTS = PROMPTS + ["血常规：WBC 12.3×10^9/L，NEUT% 85%。", "Ibuprofen 400 mg q6h PRN; max 2.4 g/day.",
                              "User: 头痛三天怎么办？", "Helper: 建议休息，多喝水。"]
# Reported, not gated: leading whitespace is where SentencePiece front-ends are known to
# differ, and PULSE's prompt segments never start with it.
EDGE_TEXTS = ["  leading spaces, tabs\tand\nnew lines  "]
# Argmax agreement over all prompt positions. F16 and Q8_0 against the original
# weights; lower-bit types against the model with the quantized weights dequantized
# (what llama.cpp should compute), so the gate measures the runtime, not the rounding.
# The basis comes from the recipe table's gate class; the thresholds per GGUF type are here.
GATES = {"F16": 1.0, "Q8_0": 0.99}
DEFAULT_GATE = 0.95


def gate_for(quant: str) -> tuple[str, float]:
    from ..formats import recipe
    return recipe("gguf", quant).gate.removeprefix("gguf-"), GATES.get(quant, DEFAULT_GATE)


def reference_tokens(folder) -> list[list[int]]:
    """PULSE prompt ids for each verification prompt, as the official demo builds them."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder.path, local_files_only=True)
    eos = tok.convert_tokens_to_ids("</s>")
    add = folder.arch == "llama"  # the 20b demo keeps the tokenizer's BOS per segment
    out = []
    for p in PROMPTS:
        ids = []
        for seg in prompt_segments([{"role": "user", "content": p}], None):
            ids += tok(seg, add_special_tokens=add)["input_ids"] + [eos]
        out.append(ids + tok(PRIMER, add_special_tokens=add)["input_ids"][:1])
    return out


def _hf_model(folder, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder.path, local_files_only=True, dtype=dtype).eval()


def _reference_dtype(folder):
    import psutil
    import torch
    fits = folder.n_params_estimate * 4 < 0.6 * psutil.virtual_memory().available
    return torch.float32 if fits else torch.bfloat16


def hf_logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    import torch
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def dequantized_model(folder, gguf_path: Path, tensor_map, dtype):
    """The HF model with every weight replaced by its dequantized GGUF tensor."""
    import gguf
    import torch
    model = _hf_model(folder, dtype)
    by_gguf = {g: (hf, tr) for hf, g, tr in tensor_map}
    state = model.state_dict()
    for t in gguf.GGUFReader(gguf_path).tensors:
        hf, tr = by_gguf[t.name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        arr = gguf_convert.undo(arr, tuple(tr) if tr else None)
        key = hf if hf in state else next(k for k in state if k.endswith(hf) or hf.endswith(k))
        state[key].copy_(torch.from_numpy(np.array(arr, dtype=np.float32)).to(state[key].dtype))
    return model


def llama_logits(gguf_path: Path, prompts: list[list[int]], threads=None) -> list[np.ndarray]:
    from ..runtime.backends.llama import LlamaCppBackend
    n_ctx = max(len(p) for p in prompts) + 8
    llm = LlamaCppBackend({"model": gguf_path}, "cpu", {"n_ctx": n_ctx, "logits_all": True, "threads": threads})
    out = [llm.logits(ids) for ids in prompts]
    del llm
    return out


def compare_logits(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    agree = np.concatenate([(r.argmax(-1) == g.argmax(-1)) for r, g in zip(ref, got)])
    err = np.concatenate([np.abs(r - g).max(-1) for r, g in zip(ref, got)])
    return {"argmax_agreement": float(agree.mean()), "positions": int(agree.size),
            "logit_max_abs": float(err.max()), "logit_mean_max_abs": float(err.mean()),
            "ref_logit_max_abs": float(max(np.abs(r).max() for r in ref))}


def _differences(tok, llm, texts) -> list[dict]:
    out = []
    for text in texts:
        ref = tok(text, add_special_tokens=False)["input_ids"]
        ids = llm.tokenize(text, add_bos=False)
        back = llm.detokenize(ids).decode("utf-8", errors="replace")
        if ids != ref or back.strip() != text.strip():
            out.append({"text": text, "transformers": ref[:20], "llama.cpp": ids[:20], "decoded": back})
    return out


def tokenizer_round_trip(folder, gguf_path: Path) -> dict:
    from transformers import AutoTokenizer

    from ..runtime.backends.llama import LlamaCppBackend
    tok = AutoTokenizer.from_pretrained(folder.path, local_files_only=True)
    llm = LlamaCppBackend({"model": gguf_path}, "cpu", {"vocab_only": True})
    mismatches, edge = _differences(tok, llm, ROUND_TRIP_TEXTS), _differences(tok, llm, EDGE_TEXTS)
    return {"texts": len(ROUND_TRIP_TEXTS), "exact": len(ROUND_TRIP_TEXTS) - len(mismatches),
            "mismatches": mismatches, "passed": not mismatches, "edge_cases_differing": edge}


def export_llm(model_id: str, weights, *, out=None, quant: str = "F16", keep_f16: bool = False,
               overwrite: bool = False, force: bool = False, threads: int | None = None,
               log: Callable[[str], None] = lambda m: None) -> Path:
    import torch
    if weights is None:
        raise UsageError("PULSE needs its Hugging Face folder: --weights ./PULSE-7bv5")
    if quant not in QUANTS:
        raise UsageError(f"unknown GGUF type '{quant}'", f"choose from {', '.join(QUANTS)}")
    folder = inspect_folder(weights, expect=model_id)
    out = bundle_path(out or f"{folder.model_id}-{quant.lower()}.omedge", overwrite)
    n = folder.n_params_estimate
    log(f"{folder.model_id}: {folder.arch}, ~{n / 1e9:.2f} B parameters, {len(folder.shards)} shard(s)")
    with BundleWriter(out, overwrite=overwrite) as writer:
        final_bytes = n * BITS_PER_WEIGHT[quant] / 8
        writer.check_space(int(n * 2 + (final_bytes if quant != "F16" else 0) + (64 << 20)))
        work = writer.dir / ".work"
        work.mkdir()
        f16 = (writer.dir if quant == "F16" or keep_f16 else work) / "model-F16.gguf"
        log("converting to GGUF F16 (streaming, shard by shard)")
        conversion = gguf_convert.convert(folder, f16, log)
        final = f16
        quant_info = None
        if quant != "F16":
            log(f"quantizing to {quant} with llama.cpp")
            final = writer.dir / f"model-{quant}.gguf"
            quant_info = quantize(f16, final, quant, threads)

        log("verifying against transformers")
        prompts = reference_tokens(folder)
        parity, failures, gated_ref = _verify_gguf(folder, final, conversion, quant, prompts, threads)
        if failures and not force:
            raise ParityError(f"{quant} GGUF failed its parity gate: {'; '.join(failures)}",
                              "no bundle was written; pass --force to keep it (marked in the manifest)")
        ids = np.concatenate([np.asarray(p) for p in prompts])
        offsets = np.cumsum([0] + [len(p) for p in prompts])
        top = np.concatenate([np.argsort(-r, axis=-1)[:, :8] for r in gated_ref])
        top_vals = np.take_along_axis(np.concatenate(gated_ref), top, axis=-1)
        np.savez_compressed(writer.dir / "parity.npz", ids=ids, offsets=offsets, top_ids=top,
                            top_logits=top_vals.astype(np.float32))
        import shutil
        shutil.rmtree(work, ignore_errors=True)
        conversion.pop("tensor_map")
        backends = {"llama.cpp": {"passed": parity["passed"], "failures": failures}}
        art = Artifact(name=f"gguf-{quant.lower()}", format="gguf", precision=quant, entry=final.name,
                       files=[final.name], quantization=quant_info, parity={**parity, "backends": backends},
                       verified_backends=["llama.cpp"] if parity["passed"] else [], runtime={"llama.cpp": {}},
                       inputs=["input_ids"], outputs=["logits"])
        artifacts = [art]
        if keep_f16 and quant != "F16":
            artifacts.append(Artifact(name="gguf-f16", format="gguf", precision="F16", entry=f16.name,
                                      files=[f16.name], runtime={"llama.cpp": {}}, verified_backends=[],
                                      parity={"passed": None, "note": "intermediate, kept on request, not verified"}))
        spec = get_spec(folder.model_id)
        manifest = Manifest(
            model={"id": folder.model_id, "variant": spec.default_variant, "kind": spec.kind, "title": spec.title,
                   "licence": LICENCE, "source": SOURCE, "parameters": int(n),
                   "architecture": folder.config["architectures"][0]},
            weights={"source": "hf-folder", "folder": folder.path.name, "shards": [s.name for s in folder.shards]},
            inputs=[i.to_dict() for i in spec.inputs], outputs=[o.to_dict() for o in spec.outputs],
            primary_output=spec.primary_output, preprocess=spec.preprocess, artifacts=artifacts,
            verification={"file": "parity.npz", "prompts": PROMPTS, "reference": "transformers, same token ids"},
            extra={"llm": {"arch": folder.arch, "context_length": conversion["context_length"], "sampling": SAMPLING,
                           "prompt": PROMPT}, "conversion": conversion},
            forced=not parity["passed"], tools={"torch": torch.__version__, **_llama_version()})
        path = writer.commit(manifest)
    log(f"wrote {path}")
    return path


def _verify_gguf(folder, final: Path, conversion: dict, quant: str, prompts, threads):
    """Logits of llama.cpp vs transformers on the same ids (and vs the dequantized weights
    for k-quants), plus the tokenizer round trip. Returns (parity, failures, gated reference)."""
    dtype = _reference_dtype(folder)
    basis, threshold = gate_for(quant)
    model = _hf_model(folder, dtype)
    ref = hf_logits(model, prompts)
    del model
    gc.collect()
    got = llama_logits(final, prompts, threads)
    parity = {"vs_original": compare_logits(ref, got), "reference_dtype": str(dtype).replace("torch.", "")}
    gated_ref = ref
    if basis == "dequantized":
        model = dequantized_model(folder, final, conversion["tensor_map"], dtype)
        gated_ref = hf_logits(model, prompts)
        del model
        gc.collect()
        parity["vs_dequantized"] = compare_logits(gated_ref, got)
    gated = parity["vs_dequantized" if basis == "dequantized" else "vs_original"]
    parity["gate"] = {"metric": f"argmax agreement vs {basis} weights", "min": threshold}
    parity["tokenizer"] = tokenizer_round_trip(folder, final)
    failures = []
    if gated["argmax_agreement"] < threshold:
        failures.append(f"argmax agreement {gated['argmax_agreement']:.4f} < {threshold} ({basis})")
    if not parity["tokenizer"]["passed"]:
        failures.append(f"tokenizer differs on {len(parity['tokenizer']['mismatches'])} text(s)")
    parity.update(passed=not failures, failures=failures)
    return parity, failures, gated_ref


def _llama_version() -> dict:
    import importlib.metadata
    return {"llama_cpp_python": importlib.metadata.version("llama_cpp_python")}
