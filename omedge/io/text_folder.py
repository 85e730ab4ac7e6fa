"""Local Hugging Face BERT folders (CITE's BioLinkBERT-large, MIU-VL's bert-base-uncased),
read offline and checked before anything is built: a config.json of model_type "bert" and
the WordPiece vocab.txt that the run side rebuilds its tokenizer from. Stdlib only."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def read_bert_folder(folder, uses: str) -> tuple[dict, list[str], dict]:
    """(config, vocab in id order, tokenizer_config) of `folder`; `uses` says what the model
    needs it for, in the error ("MIU-VL (GLIP-T) reads captions with bert-base-uncased")."""
    folder = Path(folder)
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        raise UsageError(f"--text-encoder {folder}: not a Hugging Face model folder (no config.json)",
                         f"give the folder that holds config.json and vocab.txt; {uses}")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UsageError(f"--text-encoder {folder}: config.json cannot be read: {e}") from None
    vocab = folder / "vocab.txt"
    if not isinstance(cfg, dict) or cfg.get("model_type") != "bert" or not vocab.is_file():
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise UsageError(f"--text-encoder {folder} is not a BERT-like folder (model_type {kind!r}, "
                         f"vocab.txt {'present' if vocab.is_file() else 'missing'})", uses)
    with open(vocab, encoding="utf-8") as f:  # one token per line, as transformers' load_vocab reads it
        words = [line.rstrip("\n") for line in f]
    while words and words[-1] == "":
        words.pop()
    tok = folder / "tokenizer_config.json"
    try:
        tok_cfg = json.loads(tok.read_text(encoding="utf-8")) if tok.is_file() else {}
    except (ValueError, OSError) as e:
        raise UsageError(f"--text-encoder {folder}: tokenizer_config.json cannot be read: {e}") from None
    return cfg, words, tok_cfg
