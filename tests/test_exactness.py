"""Our model equals an independent reference built straight from the original-layout files (float32, 1e-5).

The reference (tests/lavis_reference.py) recomputes the original `encode_img` from the LAVIS / SkinGPT-4 state
dicts; the LLM input is spliced by hand as the released `Chat.get_context_emb` does: the prompt split at
`<ImageHere>`, each segment tokenized on its own with SentencePiece (BOS only on the first), embedded, and the
projected image vectors concatenated between the segments.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import image_bytes
from lavis_reference import encode_image_reference
from PIL import Image
from plain_reference import pixels as reference_pixels
from plain_reference import splice, tiny_sentencepiece
from transformers import Blip2ForConditionalGeneration, LlamaForCausalLM

from skingpt4.backends.transformers_llm import load_model
from skingpt4.engine.chat import ChatEngine
from skingpt4.inputs.conversation import IMAGE_PLACEHOLDER
from skingpt4.inputs.prompt import prompt_ids

TOL = 1e-5


@pytest.fixture(scope="module")
def originals(lavis_files):
    return {name: torch.load(path, weights_only=True) for name, path in lavis_files.items()}


@pytest.fixture(scope="module")
def ours(converted_dir):
    return ChatEngine(load_model(converted_dir, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def reference_llm(llm_dir):
    return LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()


def photo(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(photo_bytes(seed))).convert("RGB")


def photo_bytes(seed: int) -> bytes:
    return image_bytes(size=(90, 70), noise_seed=seed)


def reference_features(originals, images, dims) -> torch.Tensor:
    """`encode_img` of the original, on pixels from the original eval transform written out (`plain_reference`)."""
    data = [_encoded(img) for img in images]
    pixels = torch.stack([reference_pixels(d, dims.image_size) for d in data])
    return encode_image_reference(originals["vit"], originals["qformer"], originals["proj"], pixels, dims)


def _encoded(img: Image.Image) -> bytes:
    """The photo as lossless PNG bytes (the reference decodes them itself)."""
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def reference_logits(llm, prompt: str, features: torch.Tensor) -> torch.Tensor:
    """The released code's splice (`plain_reference.splice`) into the reference Llama, read in one forward pass."""
    embeds = splice(llm.get_input_embeddings(), tiny_sentencepiece(), prompt, features)
    with torch.no_grad():
        return llm(inputs_embeds=embeds).logits[0]


def our_logits(engine: ChatEngine, prompt: str, features: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([prompt_ids(engine.tokenizer, prompt, engine.loaded.image_token_id)])
    with torch.no_grad():
        return engine.model.language_model(inputs_embeds=engine.embed(ids, features)).logits[0]


def test_image_features_match_reference(ours, originals, dims):
    images = [photo(1), photo(2)]
    expected = reference_features(originals, images, dims)
    got = ours.encode_images(images)
    assert got.shape == (2, 32, dims.llm_width)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("turns", ["one image", "one image two turns", "two images"])
def test_logits_match_reference(ours, originals, reference_llm, dims, turns):
    images = [photo(3)] if turns != "two images" else [photo(3), photo(4)]
    session = ours.session()
    for img in images:
        session.add_encoded(ours.encode_images([img])[0])
    session.ask("What's wrong with my skin?")
    if turns == "one image two turns":
        session.conversation.add_answer("This is a skin disease image with the following clinical concepts: Plaque.")
        session.ask("What treatment and medication should be recommended for this case?")
    prompt = session.conversation.prompt()
    assert prompt.count(IMAGE_PLACEHOLDER) == len(images)
    expected = reference_logits(reference_llm, prompt, reference_features(originals, images, dims))
    got = our_logits(ours, prompt, torch.stack(session.photos))
    vocab = expected.shape[-1]
    assert got.shape[0] == expected.shape[0]
    assert got.shape[-1] == vocab + 1  # the image placeholder row
    assert (got[:, :vocab] - expected).abs().max().item() <= TOL


def test_stock_blip2_forward_gives_the_same_logits(ours, converted_dir, dims):
    """Plain `Blip2ForConditionalGeneration.from_pretrained` + its own forward agree with our engine."""
    stock = Blip2ForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32).eval()
    stock.vision_model.post_layernorm.eps = 1e-5  # the one thing a stock config cannot say (skingpt4.json does)
    img = photo(5)
    session = ours.session()
    session.add_encoded(ours.encode_images([img])[0])
    session.ask("Could you describe the skin disease in this image for me?")
    prompt = session.conversation.prompt()
    ids = torch.tensor([prompt_ids(ours.tokenizer, prompt, ours.loaded.image_token_id)])
    pixels = reference_pixels(_encoded(img), dims.image_size)[None]
    with torch.no_grad():
        stock_logits = stock(pixel_values=pixels, input_ids=ids).logits[0]
    assert (stock_logits - our_logits(ours, prompt, torch.stack(session.photos))).abs().max().item() <= TOL


def test_eps_of_ln_vision_matters(ours, originals, dims):
    """Guard for the test itself: with the stock eps (1e-6) the features move well beyond the tolerance."""
    img = photo(6)
    expected = reference_features(originals, [img], dims)
    post = ours.model.vision_model.post_layernorm
    post.eps = 1e-6
    try:
        moved = (ours.encode_images([img]) - expected).abs().max().item()
    finally:
        post.eps = 1e-5
    assert moved > 10 * TOL
