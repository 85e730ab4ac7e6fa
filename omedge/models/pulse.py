"""PULSE medical LLMs (openmedlab/PULSE) as Hugging Face folders.

pulse-7b is a BLOOM (bloomz-7b1-mt fine-tune), pulse-20b an InternLM-20B in Llama
format. They are not torch ModelSpecs like the image encoders: they go HF folder ->
GGUF (omedge.exporters.gguf) -> llama.cpp. This module knows the folder layout, the
architecture facts and the official prompt format.
"""
from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..spec import ModelSpec, TensorSpec

ARCHITECTURES = {"BloomForCausalLM": ("pulse-7b", "bloom"), "LlamaForCausalLM": ("pulse-20b", "llama")}
LICENCE = "AGPL-3.0 (PULSE weights); base model terms also apply: BigScience RAIL (pulse-7b, bloomz-7b1-mt) / " \
          "InternLM licence (pulse-20b, InternLM-20B)"
SOURCE = "https://github.com/openmedlab/PULSE"

# The official demo's prompt format (cli_demo.py / web_demo_gradio.py; no HF chat_template):
# every segment is tokenised on its own and followed by the `</s>` id; generation is
# primed with the first token of "Helper: ". The 20b tokeniser puts a BOS before each
# segment (its default), the 7b BLOOM one adds none (add_special_tokens=False).
SYSTEM = "Instructions: You are Helper, a large language model full of intelligence. Respond conversationally."
MODES = {  # optional prefix of the first question
    "qa": "若我是位患者，你是位资深医生，能够协助解答我的问题和疑虑，请为我提供回复。\n",
    "consultation": "假设你是一位经验丰富并且非常谨慎的的医生，会通过和患者进行多次的问答来明确自己的猜测，"
                    "并且每次只能提一个问题，最终只会推荐相应的检验、检查、就诊科室以及疑似的诊断，请回复患者的提问：\n",
}
SAMPLING = {"top_k": 6, "top_p": 0.1, "temperature": 0.7}
PRIMER = "Helper: "
# The prompt format as data: stored in the manifest, applied by omedge.kinds.text_generation.
PROMPT = {"system": SYSTEM, "modes": MODES, "user": "User: ", "assistant": "Helper: ", "primer": PRIMER,
          "separator": "eos", "style": "PULSE demo: every segment tokenised alone and followed by </s>"}

# Jinja template stored in the GGUF (tokenizer.chat_template), for llama.cpp-based tools.
CHAT_TEMPLATE = (
    "{{ '" + SYSTEM + "' }}{{ '</s>' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '</s>' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Helper: ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Helper: ' }}{% endif %}")


def prompt_segments(messages: list[dict], mode: str | None = None) -> list[str]:
    """The complete segments of a PULSE conversation (each is followed by `</s>`)."""
    from ..kinds.text_generation import prompt_segments as segments
    return segments(PROMPT, messages, mode)


def _spec(model_id: str, variant: str, title: str, licence: str) -> ModelSpec:
    return ModelSpec(
        id=model_id, title=title, kind="text-generation", variants=(variant,), default_variant=variant,
        inputs=(TensorSpec("input_ids", "NL", dtype="int64", shape=(1, None), dynamic={1: "length"}),),
        outputs=(TensorSpec("logits", "NLC", shape=(1, None, None), dynamic={1: "length"}),),
        primary_output="logits", preprocess={"prompt": PROMPT, "sampling": SAMPLING}, licence=licence,
        source=SOURCE, exporter="omedge.exporters.llm:export_llm",
        official={"repo": "openmedlab/PULSE", "entry": "cli_demo.py main, web_demo_gradio.py predict",
                  "transform": "system text + </s>, then 'User: ' + question + </s> and 'Helper: ' + answer + </s> "
                               "per turn, generation primed with the first token of 'Helper: '; top_k 6, "
                               "top_p 0.1, temperature 0.7"},
        notes="Hugging Face folder -> GGUF -> llama.cpp; `omedge export pulse` detects 7b / 20b from the folder.")


SPECS = [_spec("pulse-7b", "7b", "PULSE-7bv5 medical LLM (BLOOM 7.1 B) -> GGUF", "AGPL-3.0 + BigScience RAIL"),
         _spec("pulse-20b", "20b", "PULSE-20bv5 medical LLM (InternLM-20B, Llama format) -> GGUF",
               "AGPL-3.0 + InternLM licence")]


@dataclass
class HFFolder:
    path: Path
    config: dict
    model_id: str
    arch: str
    shards: list[Path]
    tokenizer: str                       # "bpe" (tokenizer.json) or "spm" (tokenizer.model)
    notes: list[str] = field(default_factory=list)

    @property
    def n_params_estimate(self) -> int:
        c = self.config
        if self.arch == "bloom":
            h, L, v = c["hidden_size"] if "hidden_size" in c else c["n_embed"], c["n_layer"], c["vocab_size"]
            return v * h + L * (12 * h * h + 13 * h)
        h, L, v, f = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
        kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
        return 2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)


def inspect_folder(path: str | Path, expect: str | None = None) -> HFFolder:
    """Check a PULSE folder before any heavy work: config, tokenizer, every shard."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder", "give the Hugging Face folder with config.json, the "
                                                         "weight shards and the tokenizer files")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    config = json.loads(cfg_path.read_text())
    archs = config.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise CheckpointError(f"{path.name} is a {', '.join(archs) or config.get('model_type', 'unknown')} model",
                              "supported: BloomForCausalLM (pulse-7b) and LlamaForCausalLM (pulse-20b)")
    model_id, arch = ARCHITECTURES[known[0]]
    if expect and expect != "pulse" and expect != model_id:
        raise CheckpointError(f"{path.name} holds {known[0]}, which is {model_id}, not {expect}",
                              f"use `omedge export {model_id}` or `omedge export pulse`")
    if arch == "bloom":
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path.name} has no tokenizer.json (BLOOM's byte-level BPE tokenizer)")
        tokenizer = "bpe"
    else:
        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(f"{path.name} has no tokenizer.model (the SentencePiece tokenizer)")
        tokenizer = "spm"
    return HFFolder(path, config, model_id, arch, _shards(path), tokenizer)


def _shards(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise CheckpointError(f"{path.name}: shard(s) listed in {index_name} are missing: {', '.join(missing)}",
                                      "copy the complete folder again")
            shards = [path / n for n in names]
            break
    else:
        shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not shards:
            raise CheckpointError(f"{path.name} has no weight files (*.safetensors or pytorch_model*.bin)")
    for s in shards:
        _check_complete(s)
    return shards


def _check_complete(shard: Path):
    """Catch a truncated copy from the file's own structure, before converting."""
    size = shard.stat().st_size
    if shard.suffix == ".safetensors":
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{shard.name} is truncated ({size} bytes)")
            n = struct.unpack("<Q", head)[0]
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
                raise CheckpointError(f"{shard.name} has a damaged header: truncated or not safetensors") from e
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{shard.name} is truncated: {size} bytes, its header needs {8 + n + end}",
                                  "copy the file again and compare its sha256")
    elif not zipfile.is_zipfile(shard):
        raise CheckpointError(f"{shard.name} is truncated or not a PyTorch zip checkpoint",
                              "copy the file again and compare its sha256")
