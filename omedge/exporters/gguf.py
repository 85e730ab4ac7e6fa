"""Hugging Face folder -> GGUF (F16), streamed: tensor infos first, then one tensor at
a time from memory-mapped shards, so peak memory is about the largest tensor, not the
model. Written with the `gguf` package (llama.cpp's own converter script is not
installed with llama-cpp-python)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import CheckpointError
from ..models.pulse import CHAT_TEMPLATE, LICENCE, HFFolder


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _read_safetensors(shard: Path):
    """Header now, tensors one by one later with plain reads: a memory map would leave
    every page it touched counted in the process's memory until the kernel evicts it."""
    import json
    import struct
    with open(shard, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)

    def load(name, dtype):
        meta = header[name]
        if meta["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{shard.name}: tensor {name} has dtype {meta['dtype']}, not a float type")
        start, end = meta["data_offsets"]
        with open(shard, "rb") as f:
            f.seek(8 + n + start)
            raw = np.frombuffer(f.read(end - start), dtype=_ST_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        if meta["dtype"] != "BF16":
            return raw.astype(dtype)
        out = np.empty(raw.shape, dtype)  # bf16 is the top half of an fp32; convert in slices
        flat_in, flat_out = raw.reshape(-1), out.reshape(-1)
        for i in range(0, flat_in.size, 1 << 24):
            flat_out[i:i + (1 << 24)] = (flat_in[i:i + (1 << 24)].astype(np.uint32) << 16).view(np.float32)
        return out
    return {k: tuple(v["shape"]) for k, v in header.items()}, load


def _open_shard(shard: Path):
    """(names -> shape, loader(name, dtype) -> numpy array), without reading the data.
    Tensors arrive in the GGUF dtype directly, so no float32 copy of a whole embedding
    matrix is ever made."""
    if shard.suffix == ".safetensors":
        return _read_safetensors(shard)
    import torch
    try:
        sd = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read shard {shard.name}: {str(e).splitlines()[0][:200]}",
                              "the file is truncated, corrupt or needs unsafe unpickling") from e
    torch_dtype = {np.float16: torch.float16, np.float32: torch.float32}
    return {k: tuple(v.shape) for k, v in sd.items()}, lambda name, dtype: sd[name].to(torch_dtype[dtype]).numpy()


def bloom_qkv_to_gguf(t, n_head: int):
    """BLOOM's fused QKV is interleaved per head [h0:q,k,v, h1:q,k,v, ...]; llama.cpp
    wants [Q; K; V]."""
    n_embed = t.shape[0] // 3
    if t.ndim == 2:
        parts = t.reshape(n_head, 3, n_embed // n_head, t.shape[1])
        return np.concatenate([parts[:, i].reshape(n_embed, t.shape[1]) for i in range(3)])
    parts = t.reshape(n_head, 3, n_embed // n_head)
    return np.concatenate([parts[:, i].reshape(n_embed) for i in range(3)])


def bloom_qkv_from_gguf(t, n_head: int):
    n_embed = t.shape[0] // 3
    rest = t.shape[1:]
    return t.reshape(3, n_head, n_embed // n_head, *rest).swapaxes(0, 1).reshape(t.shape)


def llama_permute(t, n_head: int):
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def llama_unpermute(t, n_head: int):
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def hparams(folder: HFFolder) -> dict:
    c = folder.config
    if folder.arch == "bloom":
        h = c.get("hidden_size", c.get("n_embed"))
        return {"n_layer": c["n_layer"], "n_head": c["n_head"], "n_kv_head": c["n_head"], "hidden": h,
                "ffn": 4 * h, "vocab": c["vocab_size"], "ctx": c.get("seq_length", 2048),
                "eps": c.get("layer_norm_epsilon", 1e-5)}
    n_head = c["num_attention_heads"]
    rope = c.get("rope_parameters") or {}  # transformers >= 5 nests rope settings here
    scaling = c.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise CheckpointError(f"{folder.path.name} uses RoPE scaling {scaling}, which this converter does not map",
                              "PULSE-20bv5 has none; check that this is the official folder")
    return {"n_layer": c["num_hidden_layers"], "n_head": n_head, "n_kv_head": c.get("num_key_value_heads", n_head),
            "hidden": c["hidden_size"], "ffn": c["intermediate_size"], "vocab": c["vocab_size"],
            "ctx": c.get("max_position_embeddings", 2048), "eps": c.get("rms_norm_eps", 1e-6),
            "rope_theta": c.get("rope_theta", rope.get("rope_theta", 10000.0))}


def tensor_plan(folder: HFFolder) -> Iterator[tuple]:
    """(shard, hf_name, gguf_name, shape, transform) in writing order."""
    import gguf
    hp = hparams(folder)
    arch = gguf.MODEL_ARCH.BLOOM if folder.arch == "bloom" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, hp["n_layer"])
    seen = set()
    for shard in folder.shards:
        shapes, _ = _open_shard(shard)
        for hf_name in sorted(shapes):
            if hf_name.endswith("rotary_emb.inv_freq") or (folder.arch == "bloom" and hf_name.endswith("lm_head.weight")):
                continue  # recomputed by llama.cpp / tied to the token embedding
            key = hf_name.removeprefix("transformer.") if folder.arch == "bloom" else hf_name
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise CheckpointError(f"{shard.name}: tensor '{hf_name}' has no GGUF equivalent",
                                      "this is not a plain BLOOM / Llama checkpoint")
            if name in seen:
                continue
            seen.add(name)
            transform = None
            if name.endswith("attn_qkv.weight") or name.endswith("attn_qkv.bias"):
                transform = ("bloom_qkv", hp["n_head"])
            elif ".attn_q." in name:
                transform = ("permute", hp["n_head"])
            elif ".attn_k." in name:
                transform = ("permute", hp["n_kv_head"])
            yield shard, hf_name, name, shapes[hf_name], transform


def apply(t: np.ndarray, transform):
    if transform is None:
        return t
    reorder, n = transform
    return bloom_qkv_to_gguf(t, n) if reorder == "bloom_qkv" else llama_permute(t, n)


def undo(t: np.ndarray, transform):
    if transform is None:
        return t
    reorder, n = transform
    return bloom_qkv_from_gguf(t, n) if reorder == "bloom_qkv" else llama_unpermute(t, n)


def _out_dtype(gguf_name: str, shape) -> type:
    # llama.cpp convention: matrices in F16, norms / biases / 1-D tensors in F32
    return np.float16 if len(shape) == 2 else np.float32


def _tokenizer(writer, folder: HFFolder, n_vocab: int):
    import json

    import gguf
    from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab
    if folder.tokenizer == "bpe":
        vocab = BpeVocab(folder.path)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text if isinstance(text, bytes) else text.encode())
            scores.append(score)
            types.append(ttype)
        special = {t["id"] for t in json.loads((folder.path / "tokenizer.json").read_text()).get("added_tokens", [])
                   if t.get("special")}
        types = [gguf.TokenType.CONTROL if i in special else t for i, t in enumerate(types)]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("bloom")
    else:
        vocab = SentencePieceVocab(folder.path)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    if len(tokens) > n_vocab:
        raise CheckpointError(f"tokenizer has {len(tokens)} tokens but config.json says vocab_size {n_vocab}")
    for i in range(len(tokens), n_vocab):  # padded vocabulary (rows of the embedding no token uses)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder.path, load_merges=folder.tokenizer == "bpe", n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    writer.add_chat_template(CHAT_TEMPLATE)
    return len(tokens)


def convert(folder: HFFolder, out: Path, log: Callable[[str], None] = lambda m: None) -> dict:
    """Write `out` as an F16 GGUF; returns a record for the manifest."""
    import gguf
    hp = hparams(folder)
    arch_name = "bloom" if folder.arch == "bloom" else "llama"
    writer = gguf.GGUFWriter(None, arch_name)
    writer.add_name(folder.path.name)
    writer.add_license(LICENCE)
    writer.add_context_length(hp["ctx"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_block_count(hp["n_layer"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_kv_head"])
    writer.add_vocab_size(hp["vocab"])
    if folder.arch == "bloom":
        writer.add_layer_norm_eps(hp["eps"])
    else:
        writer.add_layer_norm_rms_eps(hp["eps"])
        writer.add_rope_freq_base(hp["rope_theta"])
        writer.add_rope_dimension_count(hp["hidden"] // hp["n_head"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_tokens = _tokenizer(writer, folder, hp["vocab"])

    plan = list(tensor_plan(folder))
    for _, _, name, shape, _ in plan:
        dtype = _out_dtype(name, shape)
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    current, loader = None, None
    largest = 0
    for i, (shard, hf_name, name, shape, transform) in enumerate(plan):
        if shard != current:
            log(f"converting {shard.name}")
            current, (_, loader) = shard, _open_shard(shard)
        dtype = _out_dtype(name, shape)
        t = apply(loader(hf_name, dtype), transform)
        largest = max(largest, t.nbytes)
        writer.write_tensor_data(np.ascontiguousarray(t))
        del t
    writer.close()
    return {"converter": f"omedge + gguf {gguf.__version__ if hasattr(gguf, '__version__') else ''}".strip(),
            "arch": arch_name, "tensors": len(plan), "vocab": hp["vocab"], "tokenizer_tokens": n_tokens,
            "context_length": hp["ctx"], "largest_tensor_mb": largest / 1e6,
            "tensor_map": [(hf, name, list(tr) if tr else None) for _, hf, name, _, tr in plan]}
