"""Original SkinGPT-4 / MiniGPT-4 / LAVIS checkpoints -> one standard model folder (sharded safetensors).

Inputs: the EVA ViT-g file and the BLIP-2 Q-Former file from LAVIS (or a Hugging Face BLIP-2 folder laid out like
`Salesforce/blip2-flan-t5-xxl`), a Llama-family LLM folder, and a SkinGPT-4/MiniGPT-4 checkpoint holding the
projection. Every source key is mapped or on an explicit drop list; anything else stops the conversion and names
the key. Tensors stream into shards, so peak memory stays near one shard, not the model. Pickles are read with
`weights_only=True`: a file that carries code is refused, never executed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from skingpt4.engine.sampler import folder_generation_config
from skingpt4.errors import ConversionError, first_line
from skingpt4.folder.checkpoints import (
    hub_folder,
    iter_tensors,
    load_pth,
    sha256_file,
    state_dict,
    tensor_keys,
    weight_files,
)
from skingpt4.folder.keymap import dropped, map_projection, map_qformer, map_vit
from skingpt4.folder.load import DTYPES
from skingpt4.folder.meta import NUM_QUERY_TOKENS, ModelMeta, add_image_token, make_config, save_tokenizer
from skingpt4.folder.meta import qformer_config as make_qformer_config
from skingpt4.folder.meta import vision_config as make_vision_config
from skingpt4.folder.serving import write_serving_files
from skingpt4.inputs.conversation import get_template

LLM_FILES = ["*.json", "tokenizer.model"]  # what --llm needs besides its weights

# ---------------------------------------------------------------------------------------------------------------
# Shapes -> config, with the classic mistakes caught


def vision_sizes(vision: dict[str, torch.Tensor], heads: int) -> dict:
    width = vision["vision_model.embeddings.class_embedding"].shape[-1]
    patch = vision["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["vision_model.embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[3]) for k in vision if k.startswith("vision_model.encoder.layers."))
    mlp = vision["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    if width % heads:
        raise ConversionError(f"ViT width {width} is not divisible by --vit-heads {heads}")
    return make_vision_config(width, depth, heads, mlp, image_size=grid * patch, patch_size=patch)


def qformer_sizes(tensors: dict[str, torch.Tensor], heads: int, encoder_width: int) -> dict:
    queries = tensors["query_tokens"]
    if queries.shape[1] != NUM_QUERY_TOKENS:
        raise ConversionError(f"query_tokens has {queries.shape[1]} queries; SkinGPT-4 uses {NUM_QUERY_TOKENS}")
    width = queries.shape[-1]
    layers = {int(k.split(".")[3]) for k in tensors if k.startswith("qformer.encoder.layer.")}
    cross = {int(k.split(".")[3]) for k in tensors if ".crossattention." in k}
    if cross != {i for i in layers if i % 2 == 0}:
        raise ConversionError(f"Q-Former cross-attention sits in layers {sorted(cross)}, expected every 2nd layer")
    ffn = tensors["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    if width % heads:
        raise ConversionError(f"Q-Former width {width} is not divisible by --qformer-heads {heads}")
    return make_qformer_config(width, len(layers), heads, ffn, encoder_width)


def check_projection(weight: torch.Tensor, qformer_width: int, llm_width: int) -> None:
    """The most common loading error: a projection made for another LLM size or for the Q-Former-less variant."""
    out_dim, in_dim = weight.shape
    if in_dim == 5632:
        raise ConversionError(
            f"projection is [{out_dim}, 5632]: that is MiniGPT-4's Llama-2 variant without a Q-Former, which "
            "SkinGPT-4 cannot use (it needs llama_proj [hidden, 768])"
        )
    if in_dim != qformer_width:
        raise ConversionError(f"projection input width {in_dim} does not match the Q-Former width {qformer_width}")
    if out_dim != llm_width:
        sizes = {4096: "7B", 5120: "13B", 6656: "30B", 8192: "65B/70B or Falcon-40B"}
        made, have = sizes.get(out_dim, f"hidden {out_dim}"), sizes.get(llm_width, f"hidden {llm_width}")
        raise ConversionError(
            f"projection is [{out_dim}, {in_dim}], made for a {made} LLM, but --llm is {have} "
            f"(hidden size {llm_width}): use the LLM the checkpoint was trained with"
        )


# ---------------------------------------------------------------------------------------------------------------
# Streaming writer


class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes`, checking names and shapes as it goes."""

    def __init__(self, folder: Path, expected: dict[str, tuple[torch.Size, torch.dtype]], max_bytes: int, dtype):
        self.folder, self.expected, self.max_bytes, self.dtype = folder, expected, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.written: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.expected:
            raise ConversionError(f"converted key {key!r} is not part of the SkinGPT-4 model")
        if key in self.written or key in self.pending:
            raise ConversionError(f"key {key!r} comes from two sources")
        shape = self.expected[key][0]
        if tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"{key} has shape {list(tensor.shape)}, the model expects {list(shape)}")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, self.folder / f"shard-{len(self.shards)}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.written.update(self.pending)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, name shards the transformers way, and write the index."""
        self.flush()
        missing = sorted(set(self.expected) - self.written)
        if missing:
            raise ConversionError(f"{len(missing)} model weights have no source, e.g. {missing[0]}")
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (keys, name) in enumerate(zip(self.shards, names)):
            (self.folder / f"shard-{i}.safetensors").rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The conversion


@dataclass
class ConvertOptions:
    llm: str
    projection: Path
    vit: Path | None = None
    qformer: Path | None = None
    blip2: str | None = None
    vit_heads: int = 16  # EVA ViT-g: 1408 / 88
    qformer_heads: int = 12  # BERT-base
    dtype: str | None = None  # None keeps every tensor's source dtype
    max_shard_bytes: int = 2 * 2**30
    template: str = "skingpt4"


def convert(options: ConvertOptions, out: str | Path) -> Path:
    """Build a SkinGPT-4 model folder at `out` (written to a temporary folder, renamed when complete)."""
    out = Path(out)
    try:
        get_template(options.template)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is a file")
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output folder {out} exists and is not empty")
    if (options.blip2 is None) == (options.vit is None or options.qformer is None):
        raise ConversionError("give either --vit and --qformer (LAVIS files) or --blip2 (a HF BLIP-2 folder)")
    for path in (options.projection, options.vit, options.qformer):
        if path is not None and not Path(path).is_file():
            raise ConversionError(f"file not found: {path}")  # before any download or long read
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert_into(options, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_into(options: ConvertOptions, folder: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, Blip2ForConditionalGeneration

    sources: list[dict] = []
    towers = _read_towers(options, sources)
    projection = map_projection(state_dict(load_pth(Path(options.projection))))
    sources.append(_provenance("projection", Path(options.projection)))

    llm_dir = hub_folder(options.llm, LLM_FILES)  # config and tokenizer first: check sizes before the weights
    text_config = AutoConfig.from_pretrained(llm_dir)
    if text_config.model_type != "llama":
        raise ConversionError(f"--llm is a {text_config.model_type!r} model; SkinGPT-4 needs a Llama-family LLM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except Exception as exc:
        raise ConversionError(f"cannot load the --llm tokenizer ({first_line(exc)}); install protobuf") from None
    image_token_id = add_image_token(tokenizer)
    original_vocab = text_config.vocab_size
    text_config.vocab_size = max(original_vocab, image_token_id + 1)
    # A head tied to the embeddings has no lm_head.weight in the files: the folder gets its own copy (same logits),
    # so the image token's extra row and every later load treat both matrices alike.
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    text_config.tie_word_embeddings = False

    vcfg = vision_sizes(towers, options.vit_heads)  # (no second dict of tower tensors: it would outlive them)
    qcfg = qformer_sizes(towers, options.qformer_heads, vcfg["hidden_size"])
    check_projection(projection["language_projection.weight"], qcfg["hidden_size"], text_config.hidden_size)
    config = make_config(vcfg, qcfg, text_config, image_token_id)
    with torch.device("meta"):
        skeleton = Blip2ForConditionalGeneration(config)
    expected = {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()}

    dtype = DTYPES[options.dtype] if options.dtype else None
    writer = ShardWriter(folder, expected, options.max_shard_bytes, dtype)
    for key, tensor in {**towers, **projection}.items():
        writer.add(key, tensor)
    del towers, projection
    for path in weight_files(hub_folder(options.llm, [*LLM_FILES, "*.safetensors"])):
        sources.append(_provenance("llm", path))
        for key, tensor in iter_tensors(path):
            if dropped(key, "llm") or (tied and key == "lm_head.weight"):  # tied: the embeddings are the head
                continue
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                tensor = _grow_rows(tensor, text_config.vocab_size)
            writer.add(f"language_model.{key}", tensor)
            if tied and key == "model.embed_tokens.weight":
                writer.add("language_model.lm_head.weight", tensor.clone())
    writer.close()

    config.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    folder_generation_config(tokenizer, image_token_id).save_pretrained(folder)
    meta = ModelMeta(template=options.template, image_size=vcfg["image_size"], sources=sources)
    meta.description = "converted by skingpt4 convert"
    meta.save(folder)
    write_serving_files(folder)  # for vLLM and AutoProcessor


def _read_towers(options: ConvertOptions, sources: list[dict]) -> dict[str, torch.Tensor]:
    """Vision tower, ln_vision and Q-Former, from the two LAVIS files or a HF BLIP-2 folder."""
    if options.blip2 is not None:
        return _read_blip2(_blip2_folder(options.blip2), sources)
    vit, _ = map_vit(state_dict(load_pth(Path(options.vit))))
    qformer = map_qformer(state_dict(load_pth(Path(options.qformer))))
    sources += [_provenance("vit", Path(options.vit)), _provenance("qformer", Path(options.qformer))]
    return {**vit, **qformer}


def _blip2_folder(name: str) -> Path:
    """A BLIP-2 folder with (at least) the shards that hold the vision tower and Q-Former.

    From the hub only those shards are fetched: the Flan-T5-XXL rest of blip2-flan-t5-xxl is some 45 GB.
    """
    folder = hub_folder(name, ["*.json"])
    _check_blip2_variant(folder, name)
    index = folder / "model.safetensors.index.json"
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")) or not index.is_file():
        return hub_folder(name, ["*.json", "*.safetensors"])
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = {f for k, f in weight_map.items() if k.startswith(("vision_model.", "qformer.")) or k == "query_tokens"}
    return hub_folder(name, ["*.json", *sorted(shards)])


def _check_blip2_variant(folder: Path, name: str) -> None:
    """SkinGPT-4's Q-Former and ln_vision are blip2-flan-t5-xxl's; the OPT and Flan-T5-XL variants differ."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return  # a bare folder of tensors: nothing to check against
    text = json.loads(config_path.read_text()).get("text_config") or {}
    kind, width = text.get("model_type"), text.get("d_model") or text.get("hidden_size")
    if (kind, width) != ("t5", 4096):
        raise ConversionError(
            f"--blip2 {name} has a {kind} text model (width {width}); SkinGPT-4 uses the Q-Former of "
            "blip2-flan-t5-xxl (t5, 4096), and the other variants' Q-Formers differ"
        )


def _read_blip2(folder: Path, sources: list[dict]) -> dict[str, torch.Tensor]:
    """A HF BLIP-2 folder: read only vision_model.*, qformer.*, query_tokens; the LLM side is never loaded."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        wanted = []
        for key in tensor_keys(path):
            if dropped(key, "blip2"):
                continue
            if not (key.startswith(("vision_model.", "qformer.")) or key == "query_tokens"):
                raise ConversionError(f"unexpected key {key!r} in --blip2: not mapped and not on the drop list")
            wanted.append(key)
        if wanted:
            sources.append(_provenance("blip2", path))
            tensors.update(iter_tensors(path, wanted))
    return tensors


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Add zero rows for the image placeholder (never read: its positions are overwritten, its logit suppressed)."""
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def _provenance(role: str, path: Path) -> dict:
    return {"role": role, "name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
