"""A tiny PULSE GGUF bundle behind `/v1/chat/completions`, driven by the real `openai`
client: answers equal to LLMPredictor.chat (greedy), streamed SSE, and a client that leaves
mid-stream stops the generation and frees the model's slot."""
from __future__ import annotations

import re
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llama_cpp")
import openai

import omedge
from omedge.manifest import stored_hash
from tests.serve.test_server import TIMEOUT, TOKEN, loopback_only, serving, wait_for  # noqa: F401

QUESTION = [{"role": "system", "content": "ignored: PULSE's own system text is applied"},
            {"role": "user", "content": "头痛三天怎么办？"}]


@pytest.fixture(scope="module")
def pulse_bundle(tmp_path_factory):
    from omedge.exporters.llm import export_llm
    from tests.pulse_folders import tiny_bloom
    folder = tiny_bloom(tmp_path_factory.mktemp("pulse") / "PULSE-7bv5-tiny")
    return export_llm("pulse", folder, quant="Q4_K_M", out=tmp_path_factory.mktemp("b") / "pulse-7b-q4")


@pytest.fixture(scope="module")
def server(pulse_bundle):
    with serving([str(pulse_bundle)], token=TOKEN, max_queue=1) as s:
        yield s


def client(s, key=TOKEN):
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def counter(s, metric: str) -> float:
    text = httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT).text
    m = re.search(rf'^{metric}\{{model="pulse-7b-q4"\}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_models_list_names_the_bundle(server, pulse_bundle):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["pulse-7b-q4"]
    assert models[0].model_extra["manifest_sha256"] == stored_hash(pulse_bundle)


def test_chat_equals_in_process_chat(server, pulse_bundle):
    local = omedge.load(pulse_bundle)
    expected = local.chat(QUESTION, max_tokens=12, temperature=0)
    r = client(server).chat.completions.create(model="pulse-7b-q4", messages=QUESTION, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].message.role == "assistant" and r.system_fingerprint == stored_hash(pulse_bundle)
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    stream = client(server).chat.completions.create(model="pulse-7b-q4", messages=QUESTION, max_tokens=12,
                                                    temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == expected and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.system_fingerprint == stored_hash(pulse_bundle) for c in chunks)


def test_disconnect_mid_stream_stops_generation_and_frees_the_slot(server):
    m = server.model("pulse-7b-q4")
    tokens_before, cancelled_before = counter(server, "omedge_generated_tokens_total"), \
        counter(server, "omedge_generations_cancelled_total")
    stream = client(server).chat.completions.create(model="pulse-7b-q4", messages=QUESTION, max_tokens=400,
                                                    temperature=0, stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()   # the client leaves after a few tokens
    wait_for(lambda: m.admission.running == 0, "the generation to stop")
    assert counter(server, "omedge_generations_cancelled_total") == cancelled_before + 1
    time.sleep(0.3)   # a generation that had not stopped would keep counting tokens
    generated = counter(server, "omedge_generated_tokens_total") - tokens_before
    assert generated < 200, f"{generated} tokens were generated for a client that left after 3 chunks"
    r = client(server).chat.completions.create(model="pulse-7b-q4", messages=QUESTION, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")   # the slot is free again (max_queue=1)


def test_bad_requests(server):
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key").chat.completions.create(model="pulse-7b-q4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client(server).chat.completions.create(model="pulse-7b-q4", messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).chat.completions.create(model="pulse-7b-q4", max_tokens=500,
                                               messages=[{"role": "user", "content": "头痛" * 200}])
    r = httpx.post(f"{server.url}/v2/models/pulse-7b-q4/infer", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
                   timeout=TIMEOUT)
    assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]
