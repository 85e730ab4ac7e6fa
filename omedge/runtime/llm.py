"""LLMPredictor: a GGUF bundle on llama.cpp, with PULSE's prompt format, streaming,
and a history that stays inside the context window."""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterator

from ..bundle import read_manifest, verify_files
from ..errors import BackendUnavailableError, InputError
from ..models.pulse import PRIMER, prompt_segments  # stdlib only: no torch on the run side
from .backend import backend_class


class LLMPredictor:
    def __init__(self, bundle, device: str = "auto", threads: int | None = None, n_ctx: int | None = None,
                 logits_all: bool = False):
        from ..devices import plan
        self.path = Path(bundle)
        self.manifest = read_manifest(self.path)
        verify_files(self.path, self.manifest)
        art = self.manifest["artifacts"][0]
        candidates, self.skipped = plan([art], "auto" if device == "auto" else device, "llama.cpp")
        if device == "auto":  # llama.cpp bundles run on cuda or cpu
            candidates = [c for c in candidates if c[2] in ("cuda", "cpu")]
        if not candidates:
            raise BackendUnavailableError(f"llama.cpp cannot run {self.path.name} on device={device}",
                                          "; ".join(self.skipped))
        _, _, dev = candidates[0]
        self.n_ctx = n_ctx or self.manifest["llm"]["context_length"]
        self.backend = backend_class("llama.cpp")({"model": self.path / art["entry"]}, dev,
                                                 {"threads": threads, "n_ctx": self.n_ctx, "logits_all": logits_all})
        self.llm = self.backend.llm
        self.artifact = art
        self.arch = self.manifest["llm"]["arch"]
        self.eos = self.llm.token_eos()
        self.sampling = dict(self.manifest["llm"]["sampling"])

    # -- tokens -------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """One segment, tokenised as the official demo does: with a BOS for the Llama
        (20b) tokenizer's default, without for BLOOM (7b)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.arch == "llama", special=False)

    def prompt_tokens(self, messages: list[dict], mode: str | None = None) -> list[int]:
        tokens = []
        for seg in prompt_segments(messages, mode):
            tokens += self.tokenize(seg) + [self.eos]
        return tokens + self.tokenize(PRIMER)[:1]

    def _fit(self, messages: list[dict], mode, max_tokens: int) -> list[int]:
        """Drop the oldest turns until prompt + answer fit the context window."""
        messages = list(messages)
        while True:
            tokens = self.prompt_tokens(messages, mode)
            if len(tokens) + max_tokens <= self.n_ctx:
                return tokens
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(users) <= 1:
                raise InputError(f"the prompt is {len(tokens)} tokens; with max_tokens={max_tokens} it does not fit "
                                 f"the {self.n_ctx}-token context", "shorten the question or lower max_tokens")
            messages = messages[users[1]:]

    # -- generation ---------------------------------------------------------------
    def _stream(self, tokens: list[int], max_tokens: int, sampling: dict) -> Iterator[str]:
        primer = tokens[-1:]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, n = "", 0, 0
        text += decoder.decode(self.llm.detokenize(primer))
        gen = self.llm.generate(tokens, top_k=sampling["top_k"], top_p=sampling["top_p"],
                                temp=sampling["temperature"], reset=True)
        try:
            for tok in gen:
                if tok == self.eos or n >= max_tokens:
                    break
                n += 1
                text += decoder.decode(self.llm.detokenize([tok]))
                start = _answer_start(text)
                if start is not None and len(text) > max(start, emitted):
                    piece = text[max(start, emitted):]
                    emitted = len(text)
                    yield piece
        finally:
            gen.close()

    def generate(self, prompt: str, max_tokens: int = 256, stream: bool = False, mode: str | None = None,
                 **sampling):
        """Answer one question in PULSE's conversation format."""
        return self.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=stream,
                         mode=mode, **sampling)

    def chat(self, messages: list[dict], max_tokens: int = 256, stream: bool = False, mode: str | None = None,
             **sampling):
        if not messages or messages[-1]["role"] != "user":
            raise InputError("chat needs a list of messages ending with a user turn")
        params = {**self.sampling, **sampling}
        pieces = self._stream(self._fit(messages, mode, max_tokens), max_tokens, params)
        return pieces if stream else "".join(pieces).strip()

    def predict(self, prompts, max_tokens: int = 256, **sampling) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [self.generate(p, max_tokens=max_tokens, **sampling) for p in prompts]

    def describe(self) -> dict:
        m = self.manifest
        return {"bundle": str(self.path), "model": m["model"]["id"], "weights": m["weights"]["source"],
                "artifact": self.artifact["name"], "format": "gguf", "precision": self.artifact["precision"],
                **self.backend.describe(), "parity": self.artifact.get("parity", {}).get("passed"),
                "skipped": self.skipped}


def _answer_start(text: str) -> int | None:
    """Where the answer begins after the model's own "Helper:" marker, or None while
    the text could still be that marker."""
    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    if stripped.startswith("<s>"):
        stripped, offset = stripped[3:], offset + 3
    marker = PRIMER.strip()
    if stripped.startswith(marker):
        rest = stripped[len(marker):]
        if not rest:
            return None
        return offset + len(marker) + (1 if rest.startswith(" ") else 0)
    if marker.startswith(stripped):
        return None
    return offset
