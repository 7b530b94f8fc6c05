"""Other model families behind every surface (`folder/family.py`, `engine/family.py`): tiny random Gemma 3
(MedGemma's family), Qwen2.5-VL (SkinGPT-R1's) and LLaVA-1.5 folders built in-process with their own transformers
classes, processors and chat templates. Exactness is checked against each family's own `generate` on its processor's
inputs for messages written out here by hand."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import image_bytes
from PIL import Image

from skingpt4.cli.main import main
from skingpt4.engine.factory import EngineOptions, open_engine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import Cancelled, InputError
from skingpt4.folder.family import FAMILIES as FAMILY_FACTS
from skingpt4.folder.family import UNTRAINED_KEY, family_info, family_of, pixel_options
from skingpt4.folder.tiny_families import BUILDERS, build_tiny_family
from skingpt4.inputs.conversation import AnswerText
from skingpt4.inputs.family_prompt import ThinkingAnswer, family_template
from skingpt4.inputs.images import load_image
from skingpt4.serve.safety import DISCLAIMER

FAMILIES = list(BUILDERS)
GREEDY = GenerationSettings.greedy(max_new_tokens=10)
QUESTION, FOLLOW_UP = "What is this rash?", "Which treatment would you suggest?"
SKIN_R1 = "You are a professional AI dermatology assistant."


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_family(name, root / f"tiny-{name}") for name in FAMILIES}


@pytest.fixture(scope="session")
def engines(family_dirs):
    return {name: open_engine(EngineOptions(model=str(folder))) for name, folder in family_dirs.items()}


def photo(seed: int) -> Image.Image:
    return load_image(image_bytes(size=(80, 64), noise_seed=seed))


# What each model's card or its authors' code asks for: MedGemma a system turn, SkinGPT-R1 its system prompt before
# the first question (its inference code), LLaVA-1.5 none.
SYSTEM = {"gemma3": ("You are an expert dermatologist.", "turn"), "qwen2_5_vl": (SKIN_R1, "question")}


def by_hand(engine, turns: list[tuple[str, tuple[int, str]]]) -> list[dict]:
    """The chat messages as a user of the family's processor writes them: (role, (n photos, text)) turns."""
    system, where = SYSTEM.get(engine.chat.family.name, ("", ""))
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if where == "turn" else []
    for i, (role, (count, text)) in enumerate(turns):
        text = f"{system}\n\n{text}" if where == "question" and i == 0 else text
        messages.append({"role": role, "content": [{"type": "image"}] * count + [{"type": "text", "text": text}]})
    return messages


def reference(engine, batch: list[tuple[list[dict], list]], new_tokens: int) -> list[list[int]]:
    """The family's own processor and `generate` (greedy), a batch left-padded by the processor itself."""
    processor = engine.chat.processor
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in batch]
    bos = processor.tokenizer.bos_token
    images = [photos for _, photos in batch]  # one list per prompt, as the processors take a batch
    inputs = processor(
        text=texts,
        images=images,
        return_tensors="pt",
        padding=True,
        add_special_tokens=not (bos and texts[0].startswith(bos)),
    )
    out = engine.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return [row[inputs["input_ids"].shape[1] :].tolist() for row in out]


def ours(engine, session, settings=GREEDY) -> list[int]:
    """Our engine's generated ids, as its streamer receives them."""
    pieces = engine.chat.text_pieces(settings)
    engine.generate([session], settings, pieces)
    return pieces.ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_equal_the_familys_own_generate(engines, family):
    engine = engines[family]
    photos = [photo(1)] if family == "llava" else [photo(1), photo(2)]  # LLaVA-1.5 reads one photo
    session = engine.session()
    for image in photos:
        session.add_encoded(image)
    session.ask(QUESTION)
    first = ours(engine, session)
    turns = [("user", (len(photos), QUESTION))]
    assert first == reference(engine, [(by_hand(engine, turns), photos)], 10)[0]
    # the second turn reads the first answer as it was shown
    session.ask(FOLLOW_UP)
    second = ours(engine, session)
    shown = next(text for role, text in session.conversation.messages if role == 1)  # the first answer, as shown
    assert shown == engine.chat.answer(first, GREEDY)
    turns += [("assistant", (0, shown)), ("user", (0, FOLLOW_UP))]
    assert second == reference(engine, [(by_hand(engine, turns), photos)], 10)[0]
    assert session.prompt_tokens > 20 and session.completion_tokens <= 10


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_answers_as_each_alone_and_as_the_familys_batched_generate(engines, family):
    engine = engines[family]
    questions = ["Describe it.", "What could this be, in a few words please?", QUESTION]
    photos = [photo(10 + i) for i in range(len(questions))]

    def sessions():
        made = [engine.session() for _ in questions]
        for session, image, question in zip(made, photos, questions):
            session.add_encoded(image)
            session.ask(question)
        return made

    together = engine.generate(sessions(), GREEDY)
    alone = [engine.generate([s], GREEDY)[0] for s in sessions()]
    assert together == alone
    batch = [(by_hand(engine, [("user", (1, q))]), [p]) for q, p in zip(questions, photos)]
    expected = [engine.chat.answer(engine.chat.trimmed(ids), GREEDY) for ids in reference(engine, batch, 10)]
    assert together == expected
    assert engine.status().peak == 3


def asked(engine, seed: int, question: str = QUESTION):
    session = engine.session()
    session.add_encoded(photo(seed))
    session.ask(question)
    return session


def test_requests_from_two_threads_are_decoded_together_and_answer_as_alone(family_dirs):
    """API clients at once: both wait while the model is busy, then one `generate` answers both (peak 2 rows)."""
    engine = open_engine(EngineOptions(model=str(family_dirs["qwen2_5_vl"])))
    results, questions = {}, [QUESTION, "Describe the border, please."]

    def ask(key: int):
        results[key] = asked(engine, 20 + key, questions[key]).answer(GREEDY)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
    with engine.turn:  # the model is busy: both requests queue
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine.status().waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert engine.status().peak == 2
    assert [results[k] for k in range(2)] == [asked(engine, 20 + k, questions[k]).answer(GREEDY) for k in range(2)]


def test_a_cancelled_stream_leaves_its_batch_mate_answering_in_full(family_dirs):
    engine = open_engine(EngineOptions(model=str(family_dirs["gemma3"])))
    settings = GenerationSettings.greedy(max_new_tokens=40)
    whole, results = asked(engine, 31).answer(settings), {}
    cancel = threading.Event()

    def stream(key: int, flag):
        session = asked(engine, 30 + key)
        try:
            results[key] = [engine.generate([session], settings, engine.chat.text_pieces(settings), flag)]
        except Cancelled:
            results[key] = "cancelled"

    threads = [threading.Thread(target=stream, args=(0, cancel)), threading.Thread(target=stream, args=(1, None))]
    with engine.turn:
        for t in threads:
            t.start()
        while engine.status().waiting < 2:
            time.sleep(0.01)
        cancel.set()  # before its first step: the row ends at once, its mate goes on
    for t in threads:
        t.join(60)
    assert results == {0: "cancelled", 1: [[whole]]} and engine.status().peak == 2


def test_the_system_prompts_photo_sizes_and_one_photo_for_llava(engines, family_dirs):
    text = engines["gemma3"].chat.text(asked(engines["gemma3"], 3))
    assert text.startswith("<bos><start_of_turn>user\nYou are an expert dermatologist.\n\n<start_of_image>")
    text = engines["qwen2_5_vl"].chat.text(asked(engines["qwen2_5_vl"], 3))
    assert f"<|vision_end|>{SKIN_R1}\n\n{QUESTION}<|im_end|>" in text and "system\nYou are a helpful" in text
    # SkinGPT-R1's photo bounds (256 to 1280 patches of 28 px) over a folder's own; the tiny folder's are inside them
    config = family_dirs["qwen2_5_vl"] / "preprocessor_config.json"
    qwen = FAMILY_FACTS["qwen2_5_vl"]
    assert pixel_options(family_dirs["qwen2_5_vl"], qwen) == {"min_pixels": 3136, "max_pixels": 3136}
    real = json.loads(config.read_text()) | {"min_pixels": 3136, "max_pixels": 12845056}  # Qwen2.5-VL's own
    real["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    folder = family_dirs["qwen2_5_vl"].parent / "real-sizes"
    folder.mkdir(exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(real))
    assert pixel_options(folder, qwen) == {"min_pixels": 200704, "max_pixels": 1003520}
    session = engines["llava"].session()
    session.add_encoded(photo(1))
    with pytest.raises(Exception, match="reads 1 photo per consultation"):
        session.add_encoded(photo(2))
    assert session.conversation.num_images == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_choice_scores_are_the_targets_log_probability(engines, family):
    engine = engines[family]
    session = asked(engine, 3)
    ids, (inputs,), _ = engine.chat.prompt(session, GREEDY)
    target = engine.chat.tokenizer("This could be eczema.", add_special_tokens=False).input_ids
    ends = {"gemma3": "<end_of_turn>", "qwen2_5_vl": "<|im_end|>", "llava": "</s>"}  # how each ends an answer
    assert engine.chat.tokenizer.convert_ids_to_tokens(engine.chat.end_id) == ends[family]
    [score] = engine.score([(ids, [inputs], target)])
    # by hand: the whole sequence through the model once, each target token read after the one before it
    full = dict(inputs)
    full["input_ids"] = torch.tensor([ids + target])
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            tail = torch.full((1, len(target)), 1 if key == "attention_mask" else 0, dtype=inputs[key].dtype)
            full[key] = torch.cat([inputs[key], tail], 1)
    with torch.no_grad():
        logits = engine.model(**full).logits[0].double().log_softmax(-1)
    expected = sum(float(logits[len(ids) - 1 + i, t]) for i, t in enumerate(target))
    assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>It is red and scaly.</think> Likely psoriasis."],
        ["<th", "ink>It is red", " and scaly.</thi", "nk>", " Likely", " psoriasis."],
        list("<think>It is red and scaly.</think> Likely psoriasis."),
    ],
)
def test_a_thought_is_kept_apart_however_it_streams(pieces):
    answer = ThinkingAnswer(family_template("qwen2_5_vl"))
    shown = [answer.feed(p) for p in pieces] + [answer.finish()]
    assert "".join(shown) == answer.text == "Likely psoriasis."
    assert answer.reasoning == "It is red and scaly."
    plain = ThinkingAnswer(family_template("qwen2_5_vl"))
    assert plain.whole("Likely <think> psoriasis.") == AnswerText(family_template("x")).whole(
        "Likely <think> psoriasis."
    )
    unfinished = ThinkingAnswer(family_template("qwen2_5_vl"))
    assert unfinished.whole("<think>Still thinking when the budget") == "" and unfinished.reasoning.startswith("Still")


def scripted(engine, monkeypatch, text: str):
    """The model writes `text` (a reasoning model's answer), through `generate`'s streamer protocol."""
    tokenizer = engine.chat.tokenizer

    def generate(**inputs):
        prompt, streamer = inputs["input_ids"], inputs.get("streamer")
        new = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids] * prompt.shape[0])
        if streamer is not None:
            streamer.put(prompt)
            for column in new.T:
                streamer.put(column)
            streamer.end()
        return torch.cat([prompt, new], 1)

    monkeypatch.setattr(engine.model, "generate", generate)


THOUGHT_TEXT = "Red scaly plaques on the elbow."
THOUGHT = f"<think>{THOUGHT_TEXT}</think>This may be psoriasis."


def test_the_thought_reaches_records_and_the_api_but_not_the_answer(family_dirs, tmp_path, monkeypatch, store):
    from openai import OpenAI
    from test_api import Server, data_url

    from skingpt4.serve.api import ServeConfig, create_app

    engine = open_engine(EngineOptions(model=str(family_dirs["qwen2_5_vl"])))
    scripted(engine, monkeypatch, THOUGHT)
    server = Server(create_app(engine, ServeConfig(max_tokens=40), store))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="-")
        content = [{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}, {"type": "text", "text": "?"}]
        messages = [{"role": "user", "content": content}]
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=40, temperature=0)
        message = reply.choices[0].message
        assert message.content.startswith("This may be psoriasis.") and "think" not in message.content
        assert message.content.endswith(DISCLAIMER)  # the rails as for SkinGPT-4
        assert message.model_extra["reasoning_content"] == "Red scaly plaques on the elbow."
        stream = client.chat.completions.create(model="m", messages=messages, max_tokens=40, stream=True)
        chunks = [c.choices[0].delta for c in stream if c.choices]
        assert "".join(d.content or "" for d in chunks) == message.content
        assert [d.model_extra.get("reasoning_content") for d in chunks if d.model_extra.get("reasoning_content")] == [
            "Red scaly plaques on the elbow."
        ]
    finally:
        server.stop()
    saved = [store.get(r["id"]) for r in store.list()]
    assert [t["reasoning"] for r in saved for t in r["turns"] if "reasoning" in t] == [THOUGHT_TEXT] * 2
    images = tmp_path / "photos"
    images.mkdir()
    (images / "a.png").write_bytes(image_bytes())
    monkeypatch.setattr("skingpt4.engine.factory.open_engine", lambda *a, **k: engine)
    out = tmp_path / "out.jsonl"
    assert main(["diagnose", str(images), "--model", str(family_dirs["qwen2_5_vl"]), "--out", str(out)]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["answer"].startswith("This may be psoriasis.")
    assert record["reasoning"] == ["Red scaly plaques on the elbow."]


def test_web_app_folds_the_thought_in_chromium(family_dirs, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright
    from test_webapp import CHROMIUM, FAST, free_port

    from skingpt4.serve.web import NOTICE, REASONING_TITLE, WebConfig
    from skingpt4.serve.web_launch import launch

    engine = open_engine(EngineOptions(model=str(family_dirs["gemma3"])))
    scripted(engine, monkeypatch, THOUGHT)
    running = launch(engine, WebConfig(port=free_port(), settings=FAST), block=False)
    photo_file = tmp_path / "lesion.png"
    photo_file.write_bytes(image_bytes())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            page = browser.new_page()
            page.goto(running.url)
            expect(page.locator("#untrained-banner")).to_contain_text("UNTRAINED")
            page.locator("input[type=file]").set_input_files(str(photo_file))
            expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
            page.locator("#start").click()
            page.locator("#question textarea").fill("What is this?")
            page.locator("#question textarea").press("Enter")
            chat = page.locator("#chat")
            expect(chat).to_contain_text(NOTICE, timeout=30_000)
            expect(chat).to_contain_text("This may be psoriasis.")
            expect(chat).to_contain_text(REASONING_TITLE)
            expect(page.get_by_text("Red scaly plaques on the elbow.")).not_to_be_visible()  # folded
            page.get_by_text(REASONING_TITLE).click()
            expect(page.get_by_text("Red scaly plaques on the elbow.")).to_be_visible()
            assert "&lt;think" not in page.content() and "<think>" not in chat.inner_text()
            browser.close()
    finally:
        running.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_research_command_runs_on_the_family(family_dirs, tmp_path, capsys, family):
    from test_cli_research import labelled_set

    model, data = str(family_dirs[family]), labelled_set(tmp_path)
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes(noise_seed=i))
    out = tmp_path / "diagnosed.jsonl"
    argv = ["diagnose", str(images), "--model", model, "--out", str(out), "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert "3 diagnosed, 0 failed, 0 already done" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 diagnosed, 0 failed, 3 already done" in capsys.readouterr().out
    common = ["--model", model, "--data", data, "--bootstrap", "20", "--no-progress", "--max-new-tokens", "3"]
    for extra in (["--mode", "open"], ["--mode", "choice"], ["--protocol", "clinical"]):
        target = tmp_path / "-".join(extra)
        assert main(["eval", *common, "--out", str(target), *extra]) == 0, capsys.readouterr().err
        metrics = json.loads((target / "metrics.json").read_text())
        assert metrics["n"] == 4 and metrics["run"]["model"].startswith(f"tiny-{family}@")
    from skingpt4.review.page import load_cases

    cases = load_cases(tmp_path / "--protocol-clinical" / "transcripts.jsonl")  # what `skingpt4 review` serves
    assert len(cases) == 4 and all(len(case.turns) == 8 for case in cases)


def test_two_families_head_to_head(family_dirs, tmp_path, capsys):
    from test_cli_research import labelled_set

    data, out = labelled_set(tmp_path), tmp_path / "compare"
    models = ["--model", str(family_dirs["gemma3"]), "--model", str(family_dirs["llava"])]
    argv = ["eval", *models, "--data", data, "--out", str(out), "--mode", "choice", "--bootstrap", "20"]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    comparison = json.loads((out / "comparison.json").read_text())
    assert len(comparison["pairs"]) == 1 and {"tiny-gemma3", "tiny-llava"} <= set(comparison["models"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int8", "--device", "cpu"], "--quantize converts SkinGPT-4's Llama"),
        (["--template", "llama2"], "read in its own chat template"),
    ],
)
def test_what_a_family_folder_cannot_take_is_refused_in_one_line(family_dirs, tmp_path, capsys, flags, message):
    (tmp_path / "a.png").write_bytes(image_bytes())
    argv = ["diagnose", str(tmp_path), "--model", str(family_dirs["gemma3"]), "--out", str(tmp_path / "o.jsonl")]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_what_vllm_is_sent_for_a_family_folder(family_dirs):
    """`--engine vllm` on a family folder (vLLM itself: `test_families_on_vllm.py`): the chat template's text as
    token ids, one placeholder per photo as the template writes it (vLLM's processor expands them), the photos; the
    prompt's length as vLLM reports it; the answer cleaned as ours, its thought kept apart."""
    from types import SimpleNamespace

    from skingpt4.engine.vllm import VllmEngine

    folder = family_dirs["gemma3"]
    ours = open_engine(EngineOptions(model=str(folder)))
    tokenizer = ours.chat.tokenizer
    answer = tokenizer(THOUGHT, add_special_tokens=False).input_ids
    sent = []

    async def generate(prompt, params, request_id):
        sent.append(prompt)
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=answer)], prompt_token_ids=[0] * 77, finished=True)

    engine = VllmEngine(SimpleNamespace(generate=generate), folder, params=SimpleNamespace)
    try:
        session = engine.session()
        photos = [photo(1), photo(2)]
        for image in photos:
            session.add_encoded(image)
        session.ask(QUESTION)
        assert session.answer(GREEDY) == "This may be psoriasis." and session.reasoning.startswith("Red scaly")
        processor = ours.chat.processor
        text = processor.apply_chat_template(
            by_hand(ours, [("user", (2, QUESTION))]), add_generation_prompt=True, tokenize=False
        )
        assert sent[0]["prompt_token_ids"] == tokenizer(text, add_special_tokens=False).input_ids
        assert sent[0]["prompt_token_ids"].count(tokenizer.convert_tokens_to_ids("<start_of_image>")) == 2
        assert sent[0]["multi_modal_data"]["image"] == photos and session.prompt_tokens == 77
    finally:
        engine.close()


def test_vllm_arguments_for_family_folders(family_dirs):
    from skingpt4.engine.factory import VllmOptions

    llava = VllmOptions().engine_args(family_dirs["llava"], 4, "float32")
    assert "hf_overrides" not in llava and llava["limit_mm_per_prompt"] == {"image": 1}  # vLLM's own LLaVA class
    qwen = VllmOptions().engine_args(family_dirs["qwen2_5_vl"], 4, "float32")
    assert qwen["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 3136}  # the bounds our engine uses


def test_a_failed_batch_reaches_its_requests_and_the_engine_goes_on(family_dirs, monkeypatch):
    engine = open_engine(EngineOptions(model=str(family_dirs["llava"])))
    before = asked(engine, 5).answer(GREEDY)
    real = engine.model.generate

    def out_of_memory(**inputs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.model, "generate", out_of_memory)
    session = asked(engine, 5)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.answer(GREEDY)
    assert QUESTION not in str(session.conversation.messages)  # withdrawn: a retry adds no second question
    monkeypatch.setattr(engine.model, "generate", real)
    assert asked(engine, 5).answer(GREEDY) == before
    engine.close()
    with pytest.raises(InputError, match="closed"):
        asked(engine, 5).answer(GREEDY)


def test_untrained_is_what_the_folder_says_not_its_name(family_dirs, tmp_path):
    """The random folders carry the mark in config.json; a real folder named tiny-... is not called untrained."""
    folder = Path(shutil.copytree(family_dirs["llava"], tmp_path / "llava-derm"))
    assert family_info(folder, family_of(folder)).meta.warning.startswith("UNTRAINED")  # renamed, still random
    config = json.loads((folder / "config.json").read_text())
    del config[UNTRAINED_KEY]
    (folder / "config.json").write_text(json.dumps(config))
    real = folder.rename(tmp_path / "tiny-llava-derm")
    assert family_info(real, family_of(real)).meta.warning is None


def test_training_refuses_a_family_folder_in_one_line(family_dirs, tmp_path, capsys):
    from conftest import train_config

    (tmp_path / "a.png").write_bytes(image_bytes())
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"image": "a.png", "caption": "This could be a skin disease image of eczema."}) + "\n")
    config = train_config(tmp_path / "t.yaml", model=family_dirs["gemma3"], data=data, output_dir=tmp_path / "run")
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a gemma3 folder; this needs a SkinGPT-4 folder" in err[0]


def test_a_consultation_past_the_models_context_is_refused_in_one_line(family_dirs, engines):
    """On `--device-map auto` too (the CPU here); SkinGPT-4's 2000-position budget does not apply, the model's does."""
    engine = open_engine(EngineOptions(model=str(family_dirs["gemma3"]), device_map="auto"))
    session = asked(engine, 6)
    needed = len(engine.chat.prompt(session, GREEDY)[0]) + GREEDY.max_new_tokens
    assert needed < engine.chat.context == 4096
    engine.chat.context = needed - 1
    with pytest.raises(InputError, match="passes the model's context of .*: start a new consultation"):
        session.answer(GREEDY)
    assert QUESTION not in str(session.conversation.messages)  # withdrawn
    engine.chat.context = needed
    session.ask(QUESTION)
    assert session.answer(GREEDY) == asked(engines["gemma3"], 6).answer(GREEDY)
