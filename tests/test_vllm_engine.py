"""`--engine vllm` and the vLLM plugin, without running vLLM's engine (that is `test_on_vllm.py`).

The HTTP path is proven against `FakeVllm`, a stand-in with the interface `serve` uses of vLLM's `AsyncLLM`
(`generate` an async generator of outputs whose token ids grow; cancelling it aborts the request) that does what
the plugin asks of vLLM: each `<image>` id unfolded to 32 slots in place, the photos' features in those slots,
`<image>` never generated, the stop strings honoured. It runs the tiny model with transformers' own `generate`, so
an answer equal to our embedded engine's proves the prompt ids, the photos' order, the stops and the answer's
clean-up. Where vLLM is installed (CI's vLLM environment), three more
tests run the plugin through vLLM's own code: its token matcher, its multimodal processor, and the plugin's model
class encoding photos.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from conftest import image_bytes, within
from PIL import Image
from test_api import Server, user

from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.sampler import vllm_options
from skingpt4.engine.settings import GenerationSettings
from skingpt4.engine.vllm import VllmEngine
from skingpt4.errors import Cancelled, InputError
from skingpt4.inputs.conversation import Conversation, get_template
from skingpt4.inputs.prompt import one_slot_per_image, prompt_ids
from skingpt4.serve.api import ServeConfig, create_app
from skingpt4.serve.safety import DISCLAIMER, NEUTRAL

SLOTS = 32


def unfold(ids: list[int], image_id: int) -> list[int]:
    """What the plugin asks of vLLM, written out: each `<image>` id becomes 32 in place."""
    return [x for t in ids for x in ([t] * SLOTS if t == image_id else [t])]


class FakeVllm:
    """vLLM's `AsyncLLM` as `serve --engine vllm` uses it, running the tiny model (see the module's docstring).

    `script`: token ids to answer with instead of the model's (for the rails); `endless`: repeat it without end.
    Records each request's prompt, how many outputs it sent, and which requests were aborted."""

    def __init__(self, engine: ChatEngine, script: list[int] | None = None, endless: bool = False):
        self.engine, self.script, self.endless = engine, script, endless
        self.prompts, self.sent, self.aborted = [], {}, []

    async def generate(self, prompt: dict, params, request_id: str):
        self.prompts.append(prompt)
        self.sent[request_id] = 0
        tokens = self.script if self.script is not None else self.answer(prompt, params)
        try:
            for n in range(1, params.max_tokens + 1):
                if not self.endless and n > len(tokens):
                    return
                await asyncio.sleep(0.005 if self.endless else 0)
                ids = tokens[:n] if not self.endless else [tokens[i % len(tokens)] for i in range(n)]
                self.sent[request_id] = n
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)], finished=n == len(tokens))
                if not self.endless and self.stopped(ids, params.stop):
                    return
        except (asyncio.CancelledError, GeneratorExit):  # as vLLM's `generate`: a cancelled request is aborted
            self.aborted.append(request_id)
            raise

    def answer(self, prompt: dict, params) -> list[int]:
        engine, image_id = self.engine, self.engine.loaded.image_token_id
        ids = torch.tensor([unfold(prompt["prompt_token_ids"], image_id)])
        images = prompt.get("multi_modal_data", {}).get("image", [])
        features = engine.encode_images(images) if images else None
        assert params.temperature == 0.0  # these tests decode greedily
        with torch.no_grad():
            out = engine.model.language_model.generate(
                inputs_embeds=engine.embed(ids, features),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=params.max_tokens,
                do_sample=False,
                logits_processor=[engine.forbid],  # the plugin's compute_logits bans <image> the same way
                pad_token_id=engine.tokenizer.pad_token_id,
            )
        return out[0].tolist()

    def stopped(self, ids: list[int], stops: list[str]) -> bool:
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        return any(stop in text for stop in stops)


def vllm_engine(tiny_dir, client) -> VllmEngine:
    return VllmEngine(client, tiny_dir, params=SimpleNamespace)


@pytest.fixture(scope="module")
def ours(loaded):
    server = Server(create_app(ChatEngine(loaded), ServeConfig(max_tokens=24)))
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    server.stop()


@pytest.fixture(scope="module")
def fake(loaded):
    return FakeVllm(ChatEngine(loaded))


@pytest.fixture(scope="module")
def theirs(tiny_dir, fake):
    engine = vllm_engine(tiny_dir, fake)
    server = Server(create_app(engine, ServeConfig(max_tokens=24)))
    server.engine = engine
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60), server
    server.stop()
    engine.close()


def test_folding_each_photo_to_one_id_is_what_the_plugin_unfolds(tiny_dir, loaded):
    tokenizer, image_id = loaded.tokenizer, loaded.image_token_id
    for layout in ([], [1], [2], [1, 0, 2]):  # photos per turn; [2]: two photos with no text between
        conversation = Conversation(get_template("skingpt4"))
        for turn, photos in enumerate(layout or [0]):
            for _ in range(photos):
                conversation.add_image()
            conversation.add_question(f"turn {turn}: is it spreading?")
            conversation.add_answer("It looks like eczema.")
        conversation.messages.pop()  # the last answer goes: the prompt ends open
        ids = prompt_ids(tokenizer, conversation.prompt(), image_id)
        folded = one_slot_per_image(ids, image_id)
        assert folded.count(image_id) == sum(layout) and len(folded) == len(ids) - 31 * sum(layout)
        assert unfold(folded, image_id) == ids


def test_sampling_options_are_the_originals():
    greedy = vllm_options(GenerationSettings.greedy(max_new_tokens=40), ["###", ""])
    assert greedy == {"max_tokens": 40, "stop": ["###"], "seed": None, "temperature": 0.0}
    sampled = vllm_options(GenerationSettings(temperature=0.7, top_p=0.8, seed=3), ["###", "END"])
    assert sampled == {
        "max_tokens": 300,
        "stop": ["###", "END"],
        "seed": 3,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 50,  # transformers' default, which the original's sampling inherits
    }


def conversations() -> list[list[dict]]:
    a, b = image_bytes(noise_seed=1), image_bytes(noise_seed=2)
    return [
        [user("What is this?", a)],
        [user("Compare these two.", a, b)],
        [
            user("What is this?", b),
            {"role": "assistant", "content": "It looks like a mole."},
            user("Is it changing?", a),
            {"role": "assistant", "content": "Possibly."},
            user("What should I do?"),
        ],
    ]


@pytest.mark.parametrize("n", range(3))
def test_answers_equal_the_embedded_engines(ours, theirs, fake, loaded, n):
    messages = conversations()[n]
    expected = ours.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    got = theirs[0].chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == expected.choices[0].message.content
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.usage.completion_tokens == expected.usage.completion_tokens
    sent = fake.prompts[-1]
    photos = sum(isinstance(m["content"], list) and len(m["content"]) - 1 for m in messages)
    assert (
        sent["prompt_token_ids"].count(loaded.image_token_id)
        == photos
        == len(sent.get("multi_modal_data", {}).get("image", []))
    )


def test_a_stream_joins_to_the_plain_answer(theirs):
    client = theirs[0]
    messages = conversations()[1]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    chunks = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text.endswith(DISCLAIMER.strip())


def test_the_rails_stand_in_front_of_vllm(tiny_dir, loaded):
    said = "It is benign, nothing to worry about. Keep it moisturised.### Human: now say more"
    script = loaded.tokenizer(said, add_special_tokens=False).input_ids
    assert loaded.tokenizer.decode(script) == said  # the tiny tokenizer writes this text back as it was
    engine = vllm_engine(tiny_dir, FakeVllm(ChatEngine(loaded), script=script))
    server = Server(create_app(engine, ServeConfig(max_tokens=100)))
    try:
        body = {"model": "m", "messages": [user("Is it ok?", image_bytes())], "max_tokens": 100, "temperature": 0}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    finally:
        server.stop()
        engine.close()
    text = reply["choices"][0]["message"]["content"]
    assert text.startswith(NEUTRAL) and "benign" not in text.lower() and "Human" not in text
    assert "Keep it moisturised." in text and text.rstrip().endswith(DISCLAIMER.strip())
    assert reply["skingpt4"]["referral"] == "prompt" and reply["skingpt4"]["triggers"] == ["reassurance"]


def test_a_client_that_goes_away_aborts_the_vllm_request(tiny_dir, loaded):
    fake = FakeVllm(
        ChatEngine(loaded), script=loaded.tokenizer("It is red. ", add_special_tokens=False).input_ids, endless=True
    )
    engine = vllm_engine(tiny_dir, fake)
    server = Server(create_app(engine, ServeConfig(max_tokens=1500, warmup=False)))
    try:
        body = {"model": "m", "messages": [user("hi", image_bytes())], "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        (request_id,) = fake.sent
        deadline = threading.Event()
        for _ in range(100):
            if fake.aborted:
                break
            deadline.wait(0.05)
        at_abort = fake.sent[request_id]
        deadline.wait(0.3)
    finally:
        server.stop()
        engine.close()
    print(f"\nvLLM request aborted after {at_abort} of 1500 outputs")
    assert fake.aborted == [request_id] and at_abort < 1500
    assert fake.sent[request_id] == at_abort  # nothing more was generated after the abort


def test_an_answer_cancelled_before_it_starts_ends_at_once(tiny_dir, loaded):
    fake = FakeVllm(ChatEngine(loaded))
    engine = vllm_engine(tiny_dir, fake)
    try:
        session, cancel = engine.session(), threading.Event()
        session.ask("hi")
        cancel.set()
        with pytest.raises(Cancelled):
            within(10, session.answer, GenerationSettings.greedy(max_new_tokens=8), cancel)
        assert not session.conversation.awaiting_answer and len(fake.sent) <= 1 and not any(fake.sent.values())
    finally:
        engine.close()


def test_beams_and_repetition_penalty_are_refused_in_one_line(tiny_dir, loaded):
    engine = vllm_engine(tiny_dir, FakeVllm(ChatEngine(loaded)))
    try:
        for settings in (GenerationSettings(num_beams=2), GenerationSettings(repetition_penalty=1.2)):
            session = engine.session()
            session.ask("hi")
            with pytest.raises(InputError, match="need the embedded engine"):
                session.answer(settings)
            assert not session.conversation.awaiting_answer  # the question was withdrawn
    finally:
        engine.close()


def test_serve_engine_vllm_refuses_our_engines_flags(tiny_dir, capsys):
    from skingpt4.cli.main import main

    assert main(["serve", "--model", str(tiny_dir), "--engine", "vllm", "--quantize", "int4"]) == 2
    assert "--quantize: not with --engine vllm" in capsys.readouterr().err


def test_the_plugin_is_declared_for_vllm():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "skingpt4"]
    assert plugin.value == "skingpt4.backends.vllm_plugin:register" and callable(plugin.load())


def test_folders_name_the_plugins_class(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["SkinGPT4ForConditionalGeneration"]


@pytest.mark.vllm
def test_vllms_token_matcher_unfolds_each_image_in_place(loaded):
    """With vLLM importable: the plugin's prompt update, applied by vLLM's own matcher, gives our prompt ids."""
    from vllm.multimodal.processing.processor import apply_token_matches

    from skingpt4.backends.vllm_model import image_slots

    image_id = loaded.image_token_id
    conversation = Conversation(get_template("skingpt4"))
    for photos in (2, 0, 1):
        for _ in range(photos):
            conversation.add_image()
        conversation.add_question("and now?")
    ids = prompt_ids(loaded.tokenizer, conversation.prompt(), image_id)
    (update,) = image_slots(image_id, SLOTS)
    updates = {"image": [[update.resolve(i)] for i in range(3)]}
    unfolded, found = apply_token_matches(one_slot_per_image(ids, image_id), updates)
    assert unfolded == ids and found == {"image": [0, 0, 0]}


def test_engine_arguments_for_vllm(tiny_dir):
    from skingpt4.cli.flags import engine_argument
    from skingpt4.engine.factory import VllmOptions

    options = VllmOptions(tensor_parallel_size=2, pipeline_parallel_size=3, max_images=3, extra={"nnodes": 2})
    args = options.engine_args(tiny_dir, 6, "float32")
    assert args["hf_overrides"] == {"architectures": ["SkinGPT4ForConditionalGeneration"]}  # older folders too
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (2, 3)
    assert args["limit_mm_per_prompt"] == {"image": 3} and args["max_model_len"] == 2000
    assert args["max_num_seqs"] == 6  # --max-batch: rows decoded together, in vLLM as in ours
    assert args["dtype"] == "float32"  # our engine's precision, passed by open_vllm
    with pytest.raises(InputError, match="--vllm-arg tensor_parallel_size: set by skingpt4"):
        VllmOptions(extra={"tensor_parallel_size": 4})
    assert engine_argument("nnodes=2") == ("nnodes", 2)
    assert engine_argument("distributed-executor-backend=ray") == ("distributed_executor_backend", "ray")
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        engine_argument("ray")


def test_serve_engine_vllm_without_vllm_says_how_to_install_it(tiny_dir, capsys, monkeypatch):
    from skingpt4.cli.main import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM (CI, this one)
    assert main(["serve", "--model", str(tiny_dir), "--engine", "vllm"]) == 2
    assert 'error: --engine vllm: vLLM is not installed (pip install "skingpt4[vllm]"' in capsys.readouterr().err


@pytest.mark.vllm
def test_vllms_processor_for_the_plugins_class_gives_our_ids_pixels_and_slots(tiny_dir, loaded):
    """With vLLM importable (CPU is enough): the plugin, found through its entry point, makes vLLM's multimodal
    processor for the folder turn folded ids and two photos into our prompt ids, our pixels, and one 32-slot
    placeholder per photo exactly where our image blocks are; its memory-profiling input holds 3 photos."""
    import numpy as np
    from PIL import Image
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.processing.context import TimingContext
    from vllm.plugins import load_general_plugins

    from skingpt4.folder.meta import ModelMeta
    from skingpt4.inputs.prompt import block_offsets

    load_general_plugins()
    config = ModelConfig(model=str(tiny_dir), tokenizer=str(tiny_dir), max_model_len=2000)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    assert type(processor).__name__ == "SkinGPT4MultiModalProcessor"
    image_id = loaded.image_token_id
    conversation = Conversation(get_template("skingpt4"))
    conversation.add_image()
    conversation.add_image()
    conversation.add_question("Compare them.")
    ids = prompt_ids(loaded.tokenizer, conversation.prompt(), image_id)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray((rng.random((50 + 30 * i, 70, 3)) * 255).astype(np.uint8)) for i in range(2)]
    items = processor.info.parse_mm_data({"image": photos})
    out = processor.apply(ProcessorInputs(one_slot_per_image(ids, image_id), items), TimingContext())
    assert out["prompt_token_ids"] == ids
    starts = [i for i, offset in enumerate(block_offsets(ids, image_id)) if offset == 0]
    assert [(p.offset, p.length) for p in out["mm_placeholders"]["image"]] == [(s, SLOTS) for s in starts]
    spec = ModelMeta.load(tiny_dir).pixels
    for item, photo in zip(out["mm_kwargs"]["image"], photos):
        assert float((item["pixel_values"].data - spec.eval(photo)).abs().max()) == 0.0  # the original's transform
    profiling = processor.get_dummy_mm_inputs({"image": 3})
    assert [p.length for p in profiling["mm_placeholders"]["image"]] == [SLOTS] * 3


@pytest.mark.vllm
def test_the_plugins_model_class_encodes_photos_as_ours_does(tiny_dir, loaded, monkeypatch):
    """With vLLM importable, on the CPU: the plugin's class, built by vLLM around the folder's config (its language
    model left out: vLLM's attention needs a GPU) and loaded with the folder's weights, gives our image features
    (transformers' BLIP-2 with the original's `ln_vision` eps) within float32 rounding; with vLLM's own eps they
    differ more. It never lets `<image>` be generated."""
    import socket

    import numpy as np
    import vllm.model_executor.models.blip2 as blip2
    from PIL import Image
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.plugins import load_general_plugins

    from skingpt4.backends.vllm_model import SkinGPT4ForConditionalGeneration

    load_general_plugins()  # without the plugin, vLLM refuses the folder: "not supported for now"

    class NoLanguageModel(torch.nn.Module):
        make_empty_intermediate_tensors = None

        def compute_logits(self, hidden_states):
            return torch.zeros(len(hidden_states), len(loaded.tokenizer))

    monkeypatch.setattr(blip2, "init_vllm_registered_model", lambda **kwargs: NoLanguageModel())
    model_config = ModelConfig(model=str(tiny_dir), tokenizer=str(tiny_dir), max_model_len=2000, dtype="float32")
    config = VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
        )
        ensure_model_parallel_initialized(1, 1)
        model = SkinGPT4ForConditionalGeneration(vllm_config=config).eval()  # vLLM's loader calls eval() too
    weights = load_file(tiny_dir / "model.safetensors")
    names = model.load_weights((k, v) for k, v in weights.items() if not k.startswith("language_model."))
    assert {name for name, _ in model.named_parameters()} <= names  # every tower parameter came from the folder
    with set_current_vllm_config(config):  # as vLLM's loader does next (the CPU build readies its linear layers)
        process_weights_after_loading(model, model_config, torch.device("cpu"))
    rng = np.random.default_rng(0)
    photos = [Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    pixels = torch.stack([loaded.info.meta.pixels.eval(photo) for photo in photos])
    expected = ChatEngine(loaded).encode_images(photos)
    with torch.no_grad():
        ours_eps = float((model.embed_multimodal(pixel_values=pixels) - expected).abs().max())
        model.vision_model.post_layernorm.eps = 1e-6  # what stock vLLM reads from config.json
        stock_eps = float((model.embed_multimodal(pixel_values=pixels) - expected).abs().max())
        logits = model.compute_logits(torch.zeros(3, 8))
    print(f"\nimage features vs ours: {ours_eps:.1e} (plugin), {stock_eps:.1e} (vLLM's eps)")
    assert ours_eps <= 1e-6 < stock_eps
    others = torch.ones(logits.shape[1], dtype=torch.bool)
    others[loaded.image_token_id] = False
    assert torch.isneginf(logits[:, loaded.image_token_id]).all() and torch.isfinite(logits[:, others]).all()


class SlowToEnd(FakeVllm):
    """A vLLM whose cancelled request takes a second to end (its clean-up awaits)."""

    async def generate(self, prompt: dict, params, request_id: str):
        try:
            async for output in super().generate(prompt, params, request_id):
                yield output
        finally:
            await asyncio.sleep(1.0)


def test_a_request_slow_to_end_in_vllm_never_hides_the_answers_outcome(tiny_dir, loaded, monkeypatch, caplog):
    """Past `STOP_WAIT_S` the wait for vLLM to end a cancelled request is logged, and the answer's own outcome
    (here: cancelled) is what the caller gets, never the wait's timeout."""
    import logging

    import skingpt4.engine.vllm as vllm_module

    monkeypatch.setattr(vllm_module, "STOP_WAIT_S", 0.2)
    script = loaded.tokenizer("It is red. ", add_special_tokens=False).input_ids
    engine = vllm_engine(tiny_dir, SlowToEnd(ChatEngine(loaded), script=script, endless=True))
    try:
        session, cancel = engine.session(), threading.Event()
        session.ask("hi")
        threading.Timer(0.2, cancel.set).start()
        with caplog.at_level(logging.WARNING), pytest.raises(Cancelled):
            within(10, session.answer, GenerationSettings.greedy(max_new_tokens=1500), cancel)
        assert not session.conversation.awaiting_answer  # the question was withdrawn
        assert any("had not ended after" in r.getMessage() for r in caplog.records)
        threading.Event().wait(1.0)  # let the request end in vLLM's loop before the loop stops
    finally:
        engine.close()


def test_several_sessions_are_answered_together_as_each_alone(tiny_dir, loaded):
    """`generate` with several sessions (as `diagnose` hands them over): each answer is the one it gets alone."""
    engine = vllm_engine(tiny_dir, FakeVllm(ChatEngine(loaded)))
    settings = GenerationSettings.greedy(max_new_tokens=8)

    def asked(n: int):
        session = engine.session()
        session.add_encoded(engine.encode_images([Image.open(io.BytesIO(image_bytes(noise_seed=n)))])[0])
        session.ask(f"case {n}: what is it?")
        return session

    try:
        together = engine.generate([asked(n) for n in range(3)], settings)
        alone = [asked(n).answer(settings) for n in range(3)]
    finally:
        engine.close()
    assert together == alone and len(set(alone)) > 1


def test_engine_auto_without_vllm_runs_ours_and_says_why(tiny_dir, monkeypatch):
    from skingpt4.engine.factory import EngineOptions, choose_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    engine, why = choose_engine(EngineOptions(str(tiny_dir), engine="auto"))
    assert engine == "skingpt4" and why.startswith('vLLM is not installed (pip install "skingpt4[vllm]"')
    assert choose_engine(EngineOptions(str(tiny_dir), engine="auto", quantize="int4", device="cpu")) == (
        "skingpt4",
        "--device runs on our engine",
    )
    assert (
        choose_engine(EngineOptions(str(tiny_dir), engine="auto"), beams=True)[1] == "--num-beams runs on our engine"
    )
    assert choose_engine(EngineOptions(str(tiny_dir), engine="vllm")) == ("vllm", "--engine vllm")


def test_serve_and_demo_default_to_auto_the_others_to_ours(tiny_dir, capsys, monkeypatch):
    from skingpt4.cli.main import build_parser, main

    parser = build_parser()
    for command, default in (("serve", "auto"), ("demo", "auto"), ("chat", "skingpt4"), ("diagnose", "skingpt4")):
        extra = ["x.png", "--out", "r.jsonl"] if command == "diagnose" else []
        assert parser.parse_args([command, "--model", "tiny", *extra]).engine == default
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["chat", "--model", str(tiny_dir), "--engine", "vllm"]) == 2
    assert capsys.readouterr().err.startswith("error: --engine vllm: vLLM is not installed")
    data = tiny_dir / "none.jsonl"
    argv = ["eval", "--model", str(tiny_dir), "--data", str(data), "--out", "x"]
    assert main([*argv, "--mode", "choice", "--engine", "vllm"]) == 2
    assert "--mode choice reads the model's logits: run it on our engine" in capsys.readouterr().err


def test_vllms_key_value_store_on_the_cpu_holds_max_batch_contexts(tiny_dir):
    from skingpt4.engine.factory import VllmOptions

    # the tiny model: 2 layers x 4 key/value heads x head dimension 16, keys and values, float32 (4 bytes)
    per_token = 2 * 2 * 4 * 16 * 4
    assert VllmOptions().cpu_args(tiny_dir, 8, "float32") == {"kv_cache_memory_bytes": per_token * 2000 * 8}
    assert VllmOptions().cpu_args(tiny_dir, 3, "bfloat16") == {"kv_cache_memory_bytes": per_token // 2 * 2000 * 3}
    assert VllmOptions(extra={"gpu_memory_utilization": 0.5}).cpu_args(tiny_dir, 8, "float32") == {}
