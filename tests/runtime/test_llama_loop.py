"""omedge's own generation loop on llama.cpp (real GGUF, real llama.cpp): greedy answers
are exactly a plain eval + argmax loop's, every sampling option changes what it should,
no token is decoded past max_tokens, and the loop adds no per-token cost of its own."""
import codecs
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the 'llm' extra) is needed for PULSE")

from omedge.errors import InputError
from omedge.exporters.llm import export_llm
from omedge.kinds.text_generation import LLMPredictor
from omedge.runtime.backends.llama import PENALTY_LAST_N, default_threads
from tests.pulse_folders import tiny_bloom

QUESTION = [{"role": "user", "content": "头痛三天怎么办？ What should I do about a headache?"}]


@pytest.fixture(scope="module")
def pred(tmp_path_factory):
    folder = tiny_bloom(tmp_path_factory.mktemp("loop") / "PULSE-7bv5-tiny")
    bundle = export_llm("pulse", folder, quant="F16", out=tmp_path_factory.mktemp("b") / "pulse-f16")
    return LLMPredictor(bundle, threads=1)


def eval_loop(p, ids, n, penalty=1.0):
    """The reference: llama-cpp-python's plain eval, logits of the last position, numpy
    argmax; with a penalty, llama.cpp's rule applied in numpy over the last 64 tokens."""
    llm, out = p.backend.llm, []
    llm.reset()
    llm.eval(ids)
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()
        if penalty != 1.0:
            seen = sorted(set((ids + out)[-PENALTY_LAST_N:]))
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        out.append(int(logits.argmax()))
        llm.eval([out[-1]])
    return out


def tokens(p, ids, n, **sampling):
    gen, out = p.backend.generate(ids, sampling), []
    for tok in gen:
        out.append(tok)
        if len(out) == n:
            break
    gen.close()
    return out


def test_greedy_is_exactly_the_eval_argmax_loop_and_the_librarys_generate(pred):
    ids = pred.prompt_tokens(QUESTION)
    ref = eval_loop(pred, ids, 40)
    assert tokens(pred, ids, 40, temperature=0) == ref
    assert tokens(pred, ids, 40, temperature=1.3, top_k=1, top_p=1.0) == ref  # top_k=1 is greedy too
    lib = []
    for tok in pred.backend.llm.generate(ids, temp=0, reset=True):
        lib.append(tok)
        if len(lib) == 40:
            break
    assert lib == ref
    # the answer text is those tokens' bytes, decoded once, up to EOS (the kind's stream)
    stop = ref.index(pred.eos) if pred.eos in ref else len(ref)
    raw = pred.backend.llm.detokenize(ids[-1:] + ref[:stop])
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw)  # a cut-off last character waits
    assert pred.chat(QUESTION, max_tokens=40, temperature=0) == text.removeprefix("Helper:").strip()


def test_seed_temperature_top_k_top_p_each_take_effect(pred):
    ids = pred.prompt_tokens(QUESTION)
    greedy = eval_loop(pred, ids, 24)
    hot = {"temperature": 1.5, "top_k": 0, "top_p": 1.0}
    a, b = tokens(pred, ids, 24, seed=7, **hot), tokens(pred, ids, 24, seed=7, **hot)
    assert a == b  # the same seed, the same answer
    assert any(tokens(pred, ids, 24, seed=s, **hot) != a for s in (8, 9, 10))  # the seed is used
    assert a != greedy  # the temperature is used
    assert tokens(pred, ids, 24, seed=7, temperature=1.5, top_k=0, top_p=1e-6) == greedy  # top_p keeps one
    # top_k=2: each sampled token is one of the two best at its step (checked by re-evaluating them)
    two = tokens(pred, ids, 24, seed=3, temperature=5.0, top_k=2, top_p=1.0)
    llm = pred.backend.llm
    llm.reset()
    llm.eval(ids)
    for tok in two:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        assert tok in np.argsort(logits)[-2:]
        llm.eval([tok])
    assert two != greedy


def test_repeat_penalty_follows_llama_cpps_rule(pred):
    ids = pred.prompt_tokens(QUESTION)
    plain = eval_loop(pred, ids, 32)
    ref = eval_loop(pred, ids, 32, penalty=10.0)
    assert ref != plain  # the tiny random model repeats itself: the penalty must change the answer
    assert tokens(pred, ids, 32, temperature=0, repeat_penalty=10.0) == ref


def test_max_tokens_decodes_nothing_past_it_and_stats(pred):
    pieces = list(pred.generate("hello", max_tokens=9, stream=True, temperature=0))
    s = pred.backend.stats
    assert s["tokens"] <= 9 and s["prompt_tokens"] == len(pred.prompt_tokens([{"role": "user", "content": "hello"}]))
    assert len(pieces) <= s["tokens"] and s["prefill_s"] > 0
    ids = pred.prompt_tokens(QUESTION)
    if pred.eos not in eval_loop(pred, ids, 9):
        list(pred.chat(QUESTION, max_tokens=9, stream=True, temperature=0))
        assert pred.backend.stats["tokens"] == 9  # no 10th token sampled (and its decode paid)


@pytest.mark.parametrize("bad", [{"temprature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"top_k": 2.5},
                                 {"temperature": -0.1}, {"repeat_penalty": 0}, {"seed": "x"}, {"seed": 2**32 - 1},
                                 {"temperature": True}, {"max_tokens": 0}])
def test_unknown_or_out_of_range_sampling_is_refused(pred, bad):
    with pytest.raises(InputError) as e:
        pred.generate("hello", **{"max_tokens": 2, **bad})
    assert next(iter(bad)) in str(e.value)


def test_decode_threads_are_one_per_physical_core():
    """Checked against /proc/cpuinfo (the code reads sysfs): SMT siblings share a core."""
    import os
    cpus = os.sched_getaffinity(0)
    pairs, proc, phys = set(), None, None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "processor":
            proc = int(value)
        elif key.strip() == "core id" and proc in cpus:
            pairs.add((phys, value.strip()))
        elif key.strip() == "physical id":
            phys = value.strip()
    decode, batch = default_threads()
    assert batch == len(cpus)
    if pairs:
        assert decode == len(pairs)


def test_loop_adds_no_per_token_cost(pred):
    """On the tiny model a token takes well under a millisecond, so any per-token
    Python work (re-detokenising the text, copying logits) shows: the kind's full
    stream must stay within 30% of a bare eval + argmax loop (best of 5, interleaved)."""
    ids, n = pred.prompt_tokens(QUESTION), 96
    if pred.eos in eval_loop(pred, ids, n):
        pytest.skip("the tiny model ends early here")
    ours, bare = [], []
    for _ in range(5):
        list(pred._stream(ids, n, {"temperature": 0}))
        ours.append((time.perf_counter() - pred.backend.stats["first_token_at"]) / (n - 1))
        llm = pred.backend.llm
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        eval_loop_steps(llm, n - 1)
        bare.append((time.perf_counter() - t) / (n - 1))
    assert min(ours) <= 1.3 * min(bare), (min(ours), min(bare))


def eval_loop_steps(llm, n):
    for _ in range(n):
        llm.eval([int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).argmax())])
