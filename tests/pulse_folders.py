"""Tiny PULSE-shaped Hugging Face folders, made offline: a BLOOM (pulse-7b layout) with
a byte-level BPE tokenizer and a Llama (pulse-20b layout) with a SentencePiece tokenizer,
both trained here on a small medical corpus. Hidden sizes are multiples of 256 so that
llama.cpp's K-quants really quantize every matrix (their blocks are 256 wide)."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "头痛三天怎么办？建议休息，多喝水，如持续不缓解请及时就医。",
    "患者男，65岁，反复胸闷气短两周，活动后加重，既往高血压病史十年。",
    "糖尿病患者的饮食需要注意控制总热量，少吃精制糖，多吃蔬菜。",
    "儿童发烧38.5度，精神尚可，可以先物理降温并观察。",
    "血常规：白细胞升高，中性粒细胞比例85%，提示细菌感染可能。",
    "What are the first-line treatments for community-acquired pneumonia in adults?",
    "A 30-year-old woman has a painless thyroid nodule of 1.5 cm. Ultrasound and TSH come first.",
    "Ibuprofen 400 mg every six hours as needed; do not exceed the maximum daily dose.",
    "Instructions: You are Helper, a large language model full of intelligence. Respond conversationally.",
    "User: Helper: 医生 患者 检查 诊断 治疗 药物 手术 发热 咳嗽 胸痛 腹痛 高血压 糖尿病",
    "The patient reports chest pain, shortness of breath and sweating; call emergency services.",
] * 20


def _bloom_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    # BLOOM's pre-tokenisation: split on its word regex, then bytes (no prefix space)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return len(tok.get_vocab())


def tiny_bloom(folder: Path, seed: int = 0, vocab: int = 768, hidden: int = 256, layers: int = 2,
               heads: int = 4, std: float = 0.02, safetensors: bool = True, shard: str = "1MB") -> Path:
    from transformers import BloomConfig, BloomForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    n_tok = _bloom_tokenizer(folder)
    assert n_tok <= vocab
    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, initializer_range=std,
                      seq_length=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg.architectures = ["BloomForCausalLM"]
    model = BloomForCausalLM(cfg).to(torch.bfloat16)  # released in BF16
    model.save_pretrained(folder, max_shard_size=shard)
    if not safetensors:
        _to_bin_shards(folder)
    return folder


def _to_bin_shards(folder: Path):
    """Re-save as PyTorch pickled shards + pytorch_model.bin.index.json, the layout of
    the PULSE-7bv5 release (transformers >= 5 only writes safetensors)."""
    import json

    from safetensors.torch import load_file
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    names = {s: f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i, s in enumerate(shards)}
    for s in shards:
        torch.save(load_file(folder / s), folder / names[s])
        (folder / s).unlink()
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()


def _spm_tokenizer(folder: Path):
    import io

    import json

    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    # as the released folder has it: the SentencePiece model plus its config, no tokenizer.json
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))


def tiny_llama(folder: Path, seed: int = 0, vocab: int = 768, hidden: int = 256, layers: int = 2, heads: int = 4,
               ffn: int = 512, std: float = 0.02) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    _spm_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      rope_theta=82684.6, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=std,
                      bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, max_shard_size="1MB")
    return folder
