"""`skingpt4 train`: the objective's token layout, learning a synthetic task, exact resume, step 1 -> step 2,
the exports (folder and original-format .pth, re-imported through `convert`), and one-line errors before step 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_bytes
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from skingpt4.backends.transformers_llm import load_model
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.folder.checkpoints import load_pth, state_dict
from skingpt4.folder.convert import ConvertOptions, convert
from skingpt4.folder.keymap import map_projection
from skingpt4.inputs.conversation import SYSTEM
from skingpt4.inputs.pixels import PixelSpec
from skingpt4.inputs.prompt import prompt_ids
from skingpt4.train.data import Collate, TrainDataset, TrainOrder, load_prompts, read_records
from skingpt4.train.loop import TrainConfig, load_config, lr_at, make_trainable, train

CLASSES = {"psoriasis": (200, 40, 40), "eczema": (40, 170, 60), "melanoma": (40, 60, 200), "acne": (220, 200, 40)}
CAPTION = "This could be a skin disease image of {}."
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def lesion(rgb, rng, striped: bool) -> Image.Image:
    """A solid or striped patch of `rgb` with a random shade and size."""
    colour = np.clip(np.array(rgb) + rng.integers(-30, 31, 3), 0, 255)
    height, width = (int(v) for v in rng.integers(28, 72, 2))
    pixels = np.broadcast_to(colour, (height, width, 3)).astype(np.uint8).copy()
    if striped:
        pixels[:, :: int(rng.integers(5, 10))] = 255
    return Image.fromarray(pixels, "RGB")


def make_data(root: Path, per_class: int = 10, val_per_class: int = 2, seed: int = 0) -> Path:
    """A manifest of coloured patches captioned in the step-2 format; the last images of each class are val."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for word, rgb in CLASSES.items():
        for i in range(per_class):
            name = f"images/{word}-{i}.png"
            lesion(rgb, rng, striped=bool(i % 2)).save(root / name)
            split = "val" if i >= per_class - val_per_class else "train"
            lines.append({"image": name, "caption": CAPTION.format(word), "split": split, "label": word})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("train-data"))


def config(model, data, out, **overrides) -> TrainConfig:
    """A small CPU run: 4 samples per step, no workers, no warmup surprises."""
    base = dict(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        batch_size=4,
        epochs=1,
        iters_per_epoch=4,
        warmup_steps=1,
        init_lr=1e-3,
        min_lr=1e-4,
        warmup_lr=1e-4,
        num_workers=0,
        checkpoint_every=100,
        val_every=100,
    )
    return load_config(None, {**base, **overrides})


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def changed_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


# ---------------------------------------------------------------------------------------------------------------
# The objective


def test_sample_has_the_original_token_layout(loaded, manifest):
    """[BOS] "###Human: <Img>" [32 x image] "</Img> <question> ###Assistant: " then caption + "###" without BOS;
    labels only on the caption."""
    tok = loaded.tokenizer
    prompts = load_prompts("alignment_skin", "###Human: {} ###Assistant: ")
    assert prompts[0] == "###Human: <Img><ImageHere></Img> What's wrong with my skin? ###Assistant: "
    records = read_records(manifest, "train", default_split=True)
    data = TrainDataset(records, prompts, tok, loaded.image_token_id, "###", 160, PixelSpec(), seed=0, train=True)
    sample = data[(0, 0, 0)]
    words = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    target = words(records[0].caption + "###")
    prompt = [
        tok.bos_token_id,
        *words("###Human: <Img>"),
        *[loaded.image_token_id] * 32,
        *words("</Img> What's wrong with my skin? ###Assistant: "),
    ]
    assert prompt == prompt_ids(tok, prompts[0], loaded.image_token_id)
    assert sample["input_ids"] == prompt + target
    assert sample["labels"] == [-100] * len(prompt) + target
    assert tuple(sample["pixel_values"].shape) == (3, 224, 224)
    short = TrainDataset(records, prompts, tok, loaded.image_token_id, "###", 5, PixelSpec(), seed=0, train=True)
    assert short[(0, 0, 0)]["input_ids"] == prompt + target[:5]  # max_txt_len cuts the target (even its ###)

    # The training forward = the chat engine's splice (ChatEngine.embed) + the LLM + CE on the caption only.
    batch = Collate(tok.pad_token_id)([data[(0, 0, 0)], data[(0, 5, 1)]])
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == -100).all()  # no loss on padding, whatever its id
    net = loaded.model
    with torch.no_grad():
        loss = net(**batch).loss
        engine = ChatEngine(loaded)
        features = net.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        logits = net.language_model(
            inputs_embeds=engine.embed(batch["input_ids"], features), attention_mask=batch["attention_mask"]
        ).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)


def test_order_is_a_function_of_position():
    """Resuming at micro-batch m gives what an uninterrupted order gives from m; processes split each batch."""
    straight = iter(TrainOrder(10, 4, 2, seed=3))
    batches = [next(straight) for _ in range(8)]
    resumed = iter(TrainOrder(10, 4, 2, seed=3, start=5))
    assert [next(resumed) for _ in range(3)] == batches[5:]
    first_pass = [k for b in batches for k in b if k[0] == 0]
    assert sorted(k[1] for k in first_pass) == list(range(10))  # each pass is a permutation of the records
    assert len({k[2] for b in batches for k in b}) == 2 and all(len({k[2] for k in b}) == 1 for b in batches)
    ranks = [iter(TrainOrder(10, 2, 2, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert [k for _ in range(5) for r in ranks for k in next(r)] == [k for b in batches[:5] for k in b]


def test_schedule_is_minigpt4_linear_warmup_cosine():
    cfg = TrainConfig(epochs=4, iters_per_epoch=5000, warmup_steps=5000, init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(2500, cfg) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(5000, cfg) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + np.cos(np.pi / 4)))  # cosine over all steps
    assert lr_at(20000, cfg) == pytest.approx(8e-5)
    # Warmup longer than an epoch: the original's warmup value follows the step within the epoch (restarts).
    long = TrainConfig(epochs=10, iters_per_epoch=1000, warmup_steps=5000, init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6)
    assert lr_at(1000, long) == pytest.approx(1e-6) and lr_at(4999, long) == pytest.approx(1e-6 + 99e-6 * 999 / 5000)


def test_shipped_configs_parse_and_hold_no_machine_paths():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        for value in (cfg.model, cfg.data, cfg.output_dir, cfg.init_from or ""):
            assert not Path(value).is_absolute() and "~" not in value, (path.name, value)
    step2 = load_config(CONFIGS / "step2_diagnosis.yaml")
    assert step2.init_from == load_config(CONFIGS / "step1_concepts.yaml").output_dir
    assert (step2.total_steps, step2.init_lr, step2.max_txt_len) == (100_000, 1e-4, 160)  # NC paper, Methods


# ---------------------------------------------------------------------------------------------------------------
# Learning, exports, resume


def test_tiny_model_learns_colours_to_words(tiny_dir, manifest, tmp_path):
    """Coloured patches -> "This could be a skin disease image of <word>."; the chat then names held-out ones.

    Projection-only cannot do it on a *random* tiny LLM: its frozen LM head (init std 0.02, width 64) caps every
    logit near +-1.3, so no input embedding moves the loss far from ln(513) = 6.24 (measured: 6.27 -> 6.18 in 100
    steps at lr 1e-3 and at 3e-2). LoRA on q_proj/v_proj alone has the same cap (6.27 -> 5.61). So this test trains
    the projection plus LoRA on q_proj, v_proj and lm_head (lr 2e-2). And it trains on the chat template's own
    layout (`SYSTEM###Human: {}###Assistant:`): with the released training template the classes are learnt but a
    2-layer random LLM does not carry them over to the chat prompt (65% of answers named the class, most of the
    rest cut the sentence, e.g. "iasis.").
    Measured (2 CPU cores): mean loss of the first 5 steps 5.92, of the last 5 0.011 (-99.8%), in 80 steps of 8
    samples (about 20-30 s); held-out accuracy 20/20 through `Session` (chance: 25%); 60 steps at lr 3e-2 gave
    only 10/20. Asserted: a drop >= 50% and accuracy >= 80%.
    """
    cfg = config(
        tiny_dir,
        manifest,
        tmp_path / "run",
        batch_size=8,
        iters_per_epoch=80,
        warmup_steps=5,
        init_lr=2e-2,
        min_lr=1e-2,
        lora=True,
        lora_targets=["q_proj", "v_proj", "lm_head"],
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        prompt_template=SYSTEM + "###Human: {}###Assistant:",
        val_every=40,
    )
    result = train(cfg, progress=False)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert result.steps == 80 and len(result.losses) == 80
    assert last <= 0.5 * first, (first, last)
    assert result.val_loss is not None and result.val_loss < 0.5 * first

    engine = ChatEngine(load_model(result.model_dir, device="cpu"))  # the exported folder, LoRA merged
    rng, correct, total = np.random.default_rng(123), 0, 0
    for word, rgb in CLASSES.items():
        for i in range(5):
            buffer = io.BytesIO()
            lesion(rgb, rng, striped=bool(i % 2)).save(buffer, "PNG")
            session = engine.session()
            session.add_image(buffer.getvalue())
            session.ask("What's wrong with my skin?")
            answer = session.answer(GenerationSettings.greedy(max_new_tokens=20))
            correct += word in answer
            total += 1
    assert correct / total >= 0.8, f"{correct}/{total}"

    # Only the projection and the LoRA-adapted weights changed; the exported folder has them merged.
    trained = load_file(result.trainable)
    assert all(k.startswith("language_projection.") or ".lora_" in k for k in trained)
    changed = changed_keys(tensors(tiny_dir), tensors(result.model_dir))
    layers = {f"language_model.model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    trained_names = {"language_projection.weight", "language_projection.bias", "language_model.lm_head.weight"}
    assert changed == trained_names | layers
    assert result.pth is None  # the original code has no LoRA: no .pth that would silently drop it
    lines = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 81))
    assert {"step", "epoch", "loss", "lr", "samples_per_s", "seconds"} <= lines[0].keys()
    assert [line["step"] for line in lines if "val_loss" in line] == [40, 80]


def test_projection_only_changes_only_the_projection(tiny_dir, manifest, tmp_path):
    result = train(config(tiny_dir, manifest, tmp_path / "run", iters_per_epoch=3), progress=False)
    assert set(load_file(result.trainable)) == {"language_projection.weight", "language_projection.bias"}
    assert changed_keys(tensors(tiny_dir), tensors(result.model_dir)) == {
        "language_projection.weight",
        "language_projection.bias",
    }
    for name in ("config.json", "tokenizer.json", "generation_config.json"):  # copied byte for byte
        assert (result.model_dir / name).read_bytes() == (tiny_dir / name).read_bytes()
    loaded = load_model(result.model_dir, device="cpu")
    assert loaded.info.model_id.startswith(f"{result.output_dir.name}@")  # named by its run, not "model@..."
    weight = load_file(result.trainable)["language_projection.weight"]
    assert torch.equal(loaded.model.language_projection.weight, weight)


def test_resume_continues_exactly(tiny_dir, manifest, tmp_path):
    """8 steps straight == 4 steps, a checkpoint, and a resume (with a data worker) for 4 more: the same losses.

    LoRA dropout is on and grad_accum is 2, so RNG state, data position and accumulation all have to come back."""
    common = dict(epochs=2, iters_per_epoch=4, batch_size=2, grad_accum=2, checkpoint_every=2)
    common.update(lora=True, lora_dropout=0.1)
    straight = train(config(tiny_dir, manifest, tmp_path / "a", **common), progress=False)
    first = train(config(tiny_dir, manifest, tmp_path / "b", stop_after=4, **common), progress=False)
    assert first.steps == 4 and first.trainable is None  # stopped early: no exports yet
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    rest = train(config(tiny_dir, manifest, tmp_path / "b", num_workers=1, **common), resume=True, progress=False)
    assert first.losses == straight.losses[:4]
    assert rest.losses == straight.losses[4:], (rest.losses, straight.losses[4:])  # bitwise
    assert torch.equal(
        load_file(rest.trainable)["language_projection.weight"],
        load_file(straight.trainable)["language_projection.weight"],
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_gradient_checkpointing_gives_the_same_losses(tiny_dir, manifest, tmp_path):
    plain = train(config(tiny_dir, manifest, tmp_path / "a", iters_per_epoch=3, lora=True), progress=False)
    cfg = config(tiny_dir, manifest, tmp_path / "b", iters_per_epoch=3, lora=True, gradient_checkpointing=True)
    checkpointed = train(cfg, progress=False)
    assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-6)
    net = load_model(tiny_dir, device="cpu").model
    make_trainable(net, cfg)
    lm = net.language_model
    on = getattr(lm, "is_activation_checkpointing", None)  # transformers >= 5.23; before: is_gradient_checkpointing
    assert (lm.is_gradient_checkpointing if on is None else on) and lm.training  # it really was on


def test_step1_output_feeds_step2(tiny_dir, manifest, tmp_path):
    """Step 2 starts from step 1's tensors: with a zero learning rate its first checkpoint equals step 1's output.

    Also from the exported original-format .pth."""
    step1 = train(config(tiny_dir, manifest, tmp_path / "step1", iters_per_epoch=2), progress=False)
    trained = load_file(step1.trainable)
    for source in (step1.output_dir, step1.pth):
        out = tmp_path / f"step2-{Path(source).suffix or 'dir'}"
        cfg = config(tiny_dir, manifest, out, init_from=str(source), warmup_lr=0.0, stop_after=1, checkpoint_every=1)
        train(cfg, progress=False)
        start = load_file(out / "checkpoints" / "step-0000001" / "trainable.safetensors")
        assert all(torch.equal(start[k], trained[k]) for k in trained)
    untrained = load_model(tiny_dir, device="cpu").model.language_projection.weight
    assert not torch.equal(trained["language_projection.weight"], untrained)


def test_exported_pth_reimports_through_convert(converted_dir, lavis_files, llm_dir, manifest, tmp_path):
    """Train on a converted model; the .pth maps back to the trained tensors, and `convert --projection` with it
    rebuilds exactly the exported folder."""
    result = train(config(converted_dir, manifest, tmp_path / "run", iters_per_epoch=2), progress=False)
    trained = load_file(result.trainable)
    data = torch.load(result.pth, weights_only=True)
    assert set(data) == {"model"} and set(data["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    mapped = map_projection(state_dict(load_pth(result.pth)))
    assert all(torch.equal(mapped[k], trained[k]) for k in trained)
    options = ConvertOptions(
        llm=str(llm_dir),
        projection=result.pth,
        vit=lavis_files["vit"],
        qformer=lavis_files["qformer"],
        vit_heads=4,
        qformer_heads=4,
    )
    rebuilt = convert(options, tmp_path / "reconverted")
    assert changed_keys(tensors(rebuilt), tensors(result.model_dir)) == set()
    assert changed_keys(tensors(converted_dir), tensors(result.model_dir)) == set(trained)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, before the first step


def _rewrite(manifest: Path, folder: Path, edit) -> Path:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["image"] = str(manifest.parent / row["image"])
    edit(rows)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _bad_projection(folder: Path) -> Path:
    path = folder / "wrong.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(128, 48), "llama_proj.bias": torch.zeros(128)}}, path)
    return path


BAD = {
    "missing image": (lambda rows: rows[3].update(image="/nonexistent/x.png"), {}, "image not found: /nonexistent"),
    "empty caption": (lambda rows: rows[2].update(caption="  "), {}, "empty caption"),
    "no caption field": (lambda rows: rows[1].pop("caption"), {}, "no 'caption' field"),
    "no image field": (lambda rows: rows[0].pop("image"), {}, "has no 'image' path"),
    "projection width": (None, {"init_from": _bad_projection}, "is [128, 48] but this model needs [64, 48]"),
    "prompt file": (None, {"prompts": lambda folder: str(folder / "none.txt")}, "prompt file not found"),
    "lora target": (None, {"lora": True, "lora_targets": ["nonexistent_proj"]}, "lora_targets"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_stops_before_the_first_step(case, tiny_dir, manifest, tmp_path):
    edit, overrides, message = BAD[case]
    data = _rewrite(manifest, tmp_path, edit) if edit else manifest
    overrides = {k: v(tmp_path) if callable(v) else v for k, v in overrides.items()}
    with pytest.raises(InputError) as error:
        train(config(tiny_dir, data, tmp_path / "run", **overrides), progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_config_mistakes_are_one_line(tmp_path, tiny_dir, manifest, monkeypatch):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lerning_rate: 1.0e-4\n")
    with pytest.raises(InputError, match=r"^unknown config key 'lerning_rate' \(did you mean 'init_lr'\?\)$"):
        load_config(yaml_file)
    with pytest.raises(InputError, match=r"unknown config key 'batch_sise' \(did you mean 'batch_size'\?\)"):
        load_config(None, {"batch_sise": 4})
    assert load_config(None, {"init_lr": "1e-4"}).init_lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    with pytest.raises(InputError, match="config epochs must be a positive integer"):
        load_config(None, {"epochs": 0})
    with pytest.raises(InputError, match="no checkpoint"):
        train(config(tiny_dir, manifest, tmp_path / "none"), resume=True, progress=False)
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(InputError, match="^tensorboard: true needs the tensorboard package"):
        train(config(tiny_dir, manifest, tmp_path / "tb", tensorboard=True), progress=False)


def test_output_dir_of_a_finished_run_is_not_overwritten(tiny_dir, manifest, tmp_path):
    train(config(tiny_dir, manifest, tmp_path / "run", iters_per_epoch=1), progress=False)
    with pytest.raises(InputError, match="already holds a run"):
        train(config(tiny_dir, manifest, tmp_path / "run", iters_per_epoch=1), progress=False)
    with safe_open(tmp_path / "run" / "trainable.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["language_projection.bias", "language_projection.weight"]


def test_an_unreadable_image_found_by_a_data_worker_is_one_line(tiny_dir, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "bad.png").write_text("not an image")
    (images / "good.png").write_bytes(image_bytes())
    caption = "This could be a skin disease image of eczema."
    rows = [{"image": f"imgs/{name}.png", "caption": caption} for name in ("bad", "good")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError) as error:
        train(config(tiny_dir, data, tmp_path / "run", batch_size=2, num_workers=1), progress=False)
    assert "\n" not in str(error.value) and "cannot read training image" in str(error.value)
