"""The quantized CPU path (`backends/llamacpp.py`): the LLM on llama.cpp, fed the engine's own embeddings.

Exactness is proven in float32: the same GGUF export in F32 run by llama.cpp must give transformers' logits (to
float rounding) and the same greedy answers, alone, over turns that reuse the cache, and batched. int8/int4 then
change only the arithmetic; what that costs in agreement is measured by bench/bench_quantized.py, not here (a
random tiny model's agreement means nothing).
"""

from __future__ import annotations

import io
import json
import threading
from contextlib import contextmanager

import gguf  # the dev extra installs skingpt4[cpu] (pyproject.toml): these tests always run
import numpy as np
import pytest
import torch
from conftest import endless, image_bytes
from test_scheduler import asked, question, together

from skingpt4.backends.llamacpp import load_quantized
from skingpt4.cli.main import main
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.factory import EngineOptions
from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.errors import InputError, ModelLoadError
from skingpt4.folder.load import LoadedModel


@pytest.fixture(scope="module")
def float32(tiny_dir) -> LoadedModel:
    return load_quantized(tiny_dir, "float32")


@pytest.fixture(scope="module")
def int4(tiny_dir) -> LoadedModel:
    return load_quantized(tiny_dir, "int4")


def prompt_logits(engine: ChatEngine, n: int) -> torch.Tensor:
    session = asked(engine, n)
    ids, photos, _ = engine.chat.prompt(session, GenerationSettings.greedy(max_new_tokens=8))
    with engine.lock, torch.no_grad():
        return engine.prefill([(ids, torch.stack(photos))], engine.llm.new_cache())[1][0]


def small_store(tiny_dir, loaded, float32, cells: int = 256) -> ChatEngine:
    """An engine on llama.cpp (float32) whose key/value store holds `cells` positions."""
    from skingpt4.backends.gguf import gguf_file
    from skingpt4.backends.llamacpp import LlamaCppLLM

    config = loaded.model.config.text_config
    small = LlamaCppLLM(gguf_file(tiny_dir, "float32", config), float32.model.get_input_embeddings(), 513, cells)
    return ChatEngine(LoadedModel(float32.model, float32.tokenizer, float32.info, small))


def test_llama_cpp_in_float32_computes_what_transformers_computes(loaded, float32):
    reference, ours = (
        ChatEngine(loaded, settings=EngineSettings(max_batch=1)),
        ChatEngine(float32, settings=EngineSettings(max_batch=1)),
    )
    for n in range(3):
        expected, got = prompt_logits(reference, n), prompt_logits(ours, n)
        assert got.shape == expected.shape == (loaded.model.config.text_config.vocab_size,)
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    for engine in (reference, ours):
        endless(engine)
    settings = GenerationSettings.greedy(max_new_tokens=24)
    for n in range(3):  # two turns: the second continues the first's cache on both
        mine, theirs = asked(ours, n), asked(reference, n)
        assert mine.answer(settings) == theirs.answer(settings)
        mine.ask("and the cause?"), theirs.ask("and the cause?")
        assert mine.answer(settings) == theirs.answer(settings)
        assert mine.reused_tokens == theirs.reused_tokens > 32


def test_quantized_answers_batched_equal_alone(loaded, float32):
    alone, batched = (
        ChatEngine(float32, settings=EngineSettings(max_batch=1)),
        ChatEngine(float32, settings=EngineSettings(max_batch=4)),
    )
    for engine in (alone, batched):
        endless(engine)
    settings = GenerationSettings.greedy(max_new_tokens=16)
    sessions = [asked(batched, n) for n in range(4)]
    answers = together(batched, [lambda s=s: s.answer(settings) for s in sessions])
    assert batched.status().peak == 4
    assert answers == [asked(alone, n).answer(settings) for n in range(4)]
    for n, s in enumerate(sessions):  # second turns: each row continues its own llama.cpp sequence
        s.ask(question(n + 1))
    again = together(batched, [lambda s=s: s.answer(settings) for s in sessions])
    expected = []
    for n in range(4):
        session = asked(alone, n)
        session.answer(settings)
        session.ask(question(n + 1))
        expected.append(session.answer(settings))
    assert again == expected and all(s.reused_tokens > 32 for s in sessions)


def test_gguf_holds_the_weights_in_llama_cpps_layout(tiny_dir, loaded, float32, int4):
    from skingpt4.backends.gguf import gguf_file

    config = loaded.model.config.text_config
    lm = loaded.model.language_model
    heads, head_dim = config.num_attention_heads, config.head_dim
    files = {kind: gguf_file(tiny_dir, kind, config) for kind in ("float32", "int4")}
    tensors = {kind: {t.name: t for t in gguf.GGUFReader(path).tensors} for kind, path in files.items()}
    assert len(tensors["float32"]) == 3 + 9 * config.num_hidden_layers
    q = np.asarray(tensors["float32"]["blk.1.attn_q.weight"].data)
    # llama.cpp rotates adjacent pairs, transformers the two halves of a head: row i + half <-> row 2i + 1.
    original = lm.model.layers[1].self_attn.q_proj.weight.numpy().reshape(heads, 2, head_dim // 2, -1)
    assert np.array_equal(q.reshape(heads, head_dim // 2, 2, -1), original.swapaxes(1, 2))
    types = {name: t.tensor_type.name for name, t in tensors["int4"].items()}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    down = tensors["int4"]["blk.0.ffn_down.weight"]
    back = gguf.quants.dequantize(down.data, down.tensor_type).reshape(config.hidden_size, -1)
    weight = lm.model.layers[0].mlp.down_proj.weight.numpy()
    blocks = np.abs(weight).reshape(-1, 32).max(1, keepdims=True)  # Q4_0: 16 levels over each block of 32
    assert np.all(np.abs(back - weight).reshape(-1, 32) <= blocks / 8 + 1e-6)


def test_a_full_key_value_store_drops_the_idle_session_first(tiny_dir, loaded, float32):
    engine = small_store(tiny_dir, loaded, float32)
    roomy = ChatEngine(float32, settings=EngineSettings(max_batch=1))
    for e in (engine, roomy):
        endless(e)
    settings = GenerationSettings.greedy(max_new_tokens=60)
    first, second = asked(engine, 0), asked(engine, 1)
    first.answer(settings)
    second.answer(settings)  # 2 x (about 100 + 60) positions do not fit in 256: the first session's row goes
    assert first.cache.get_seq_length() == 0 and second.cache.get_seq_length() > 150
    assert first.settle() == 0  # its row is gone: nothing to settle, no error (the surfaces call it idly)
    first.ask("and the cause?")
    answer = first.answer(settings)
    assert first.reused_tokens == 0  # recomputed from the start, to the answer a roomy store computes so
    expected = asked(roomy, 0)
    expected.answer(settings)
    expected.ask("and the cause?")
    expected.cache = None
    assert answer == expected.answer(settings)
    sessions = [asked(engine, n) for n in range(3)]  # 3 x 160 positions do not fit at once: they take turns
    with decode_batches_of(engine) as rows:
        results = together(engine, [lambda s=s: s.answer(settings) for s in sessions])
    assert results == [asked(roomy, n).answer(settings) for n in range(3)]
    assert max(rows) == 1 and engine.status().limit == 8  # one row at a time fits; no out-of-memory error


def test_beams_and_choice_scoring_need_the_unquantized_model(int4, tiny_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny_dir), "--quantize", "int4", "--mode", "choice"]
    assert main([*argv, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "error: --mode choice reads the LLM's hidden states" in capsys.readouterr().err
    engine = ChatEngine(int4)
    session = asked(engine, 0)
    with pytest.raises(InputError, match="beam search needs the unquantized model"):
        session.answer(GenerationSettings(num_beams=2, max_new_tokens=4))
    assert session.conversation.awaiting_answer  # the question is still there to answer another way
    ids, photos, _ = engine.chat.prompt(session, GenerationSettings.greedy(max_new_tokens=4))
    with pytest.raises(InputError, match="run it without --quantize"):
        engine.score([(ids, photos, [5, 6])])


def test_quantize_refuses_a_gpu_and_names_the_missing_extra(tiny_dir, monkeypatch):
    with pytest.raises(InputError, match="runs the LLM on the CPU"):
        EngineOptions(str(tiny_dir), quantize="int4", load_in_8bit=True).check()
    with pytest.raises(InputError, match="runs the LLM on the CPU"):
        EngineOptions(str(tiny_dir), quantize="int4", device="cuda").check()
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'skingpt4\[cpu\]'"):
        load_quantized(tiny_dir, "int4")


def test_chat_and_diagnose_with_quantize_int4(tiny_dir, tmp_path, monkeypatch, capsys, int4):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this rash?\n/quit\n"))
    model = ["--model", str(tiny_dir), "--quantize", "int4", "--greedy", "--max-new-tokens", "6"]
    assert main(["chat", *model]) == 0
    out = capsys.readouterr().out
    session = ChatEngine(int4, settings=EngineSettings(max_batch=1)).session()
    session.ask("What is this rash?")
    assert session.answer(GenerationSettings.greedy(max_new_tokens=6)).strip()[:8] in out  # the same answer
    (tmp_path / "in").mkdir()
    for n in range(3):
        (tmp_path / "in" / f"{n}.png").write_bytes(image_bytes(noise_seed=n))
    records = tmp_path / "r.jsonl"
    assert main(["diagnose", *model, str(tmp_path / "in"), "--out", str(records), "--no-progress"]) == 0
    assert len([json.loads(line) for line in records.read_text().splitlines()]) == 3


def test_serve_with_quantize_answers_through_the_openai_client(int4):
    import openai
    from test_api import Server, user

    from skingpt4.serve.api import ServeConfig, create_app

    server = Server(create_app(ChatEngine(int4), ServeConfig(max_tokens=16, warmup=False)))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60)
        ask = dict(model="skingpt4", messages=[user("What is this?", image_bytes())], max_tokens=8, temperature=0)
        first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
        assert first.choices[0].message.content == again.choices[0].message.content
        assert 1 <= first.usage.completion_tokens <= 8
    finally:
        server.stop()


def test_a_newcomer_that_does_not_fit_fails_alone_and_the_running_answer_goes_on(tiny_dir, loaded, float32):
    """A full store never drops a row that is decoding: with admission by free positions turned off, the
    newcomer's prefill fails as out of memory (503 for it alone) and the running answer ends as it would alone."""
    engine, roomy = small_store(tiny_dir, loaded, float32), ChatEngine(float32)
    engine.llm.capacity = None  # what admission by free positions (the next test) prevents from happening
    running, reached, answers = asked(engine, 0), stepping(engine, 60), []
    thread = threading.Thread(target=lambda: answers.append(running.answer(LONG_120)))
    thread.start()
    assert reached.wait(60)
    newcomer = asked(engine, 1)  # about 100 more positions beside the running 160: they do not fit
    with pytest.raises(torch.OutOfMemoryError):
        newcomer.answer(GenerationSettings.greedy(max_new_tokens=8))
    thread.join(120)
    assert answers == [asked(roomy, 0).answer(LONG_120)]
    assert "rash" not in str(newcomer.conversation.messages)  # withdrawn: a retry is clean
    assert asked(engine, 1).answer(LONG_120) == asked(roomy, 1).answer(LONG_120)  # with room again, it is served


def test_a_newcomer_that_does_not_fit_yet_waits_its_turn_and_is_answered(tiny_dir, loaded, float32):
    """Admission by free positions: a request joins only when every row fits the store at its longest; until
    then it waits in the queue (not refused), and is answered as it would be alone."""
    engine, roomy = small_store(tiny_dir, loaded, float32), ChatEngine(float32)
    running, reached, answers = asked(engine, 0), stepping(engine, 60), []
    thread = threading.Thread(target=lambda: answers.append(running.answer(LONG_120)))
    thread.start()
    assert reached.wait(60)
    assert asked(engine, 1).answer(LONG_120) == asked(roomy, 1).answer(LONG_120)
    thread.join(120)
    assert answers == [asked(roomy, 0).answer(LONG_120)]


LONG_120 = GenerationSettings.greedy(max_new_tokens=120)  # about 100 + 120 positions: fits the 256 alone


def stepping(engine: ChatEngine, n: int) -> threading.Event:
    """Made unable to end early; the event is set at the engine's `n`-th token step."""
    endless(engine)
    steps, reached, real_step = [], threading.Event(), engine.llm.step

    def step(*args):
        steps.append(1)
        if len(steps) == n:
            reached.set()
        return real_step(*args)

    engine.llm.step = step
    return reached


@contextmanager
def decode_batches_of(engine: ChatEngine):
    """The rows of each token step of an engine on llama.cpp."""
    rows, real_step = [], engine.llm.step

    def step(tokens, *args):
        rows.append(tokens.shape[0])
        return real_step(tokens, *args)

    engine.llm.step = step
    try:
        yield rows
    finally:
        engine.llm.step = real_step


def test_diagnose_with_quantize_int4_at_its_defaults_answers_every_photo(tiny_dir, tmp_path, int4):
    """8 photos, the default batch of 8 and 300 new tokens: 8 x (about 100 + 300) positions do not fit llama.cpp's
    2048 at once, so the rows take turns in the store; none fails."""
    (tmp_path / "in").mkdir()
    for n in range(8):
        (tmp_path / "in" / f"{n}.png").write_bytes(image_bytes(noise_seed=n))
    records = tmp_path / "r.jsonl"
    argv = ["diagnose", "--model", str(tiny_dir), "--quantize", "int4", "--greedy", str(tmp_path / "in")]
    assert main([*argv, "--out", str(records), "--no-progress"]) == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 8 and all(line["error"] is None and line["answer"] for line in lines)


def test_eight_api_clients_at_once_against_int4_are_all_answered(int4):
    """8 clients with a photo each and max_tokens 300, at once: 8 x (about 100 + 300) positions exceed llama.cpp's
    store, so some wait in the queue for room; every one is answered (none 503), in full."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from test_api import Server, user

    from skingpt4.serve.api import ServeConfig, create_app

    engine = ChatEngine(int4)
    endless(engine)  # every answer runs its 300 tokens
    server = Server(create_app(engine, ServeConfig(max_tokens=300, warmup=False)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=300)

    def ask(n: int):
        messages = [user(f"case {n}: what is this?", image_bytes(noise_seed=n))]
        return client.chat.completions.create(model="skingpt4", messages=messages, max_tokens=300, temperature=0)

    try:
        with ThreadPoolExecutor(8) as pool, decode_batches_of(engine) as rows:
            replies = list(pool.map(ask, range(8)))
    finally:
        server.stop()
    assert [r.usage.completion_tokens for r in replies] == [300] * 8
    assert 1 < max(rows) < 8  # rows shared the store, as many as fit at once
