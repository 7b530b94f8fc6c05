"""Nothing of the engine: the released code's input, spliced by hand, and stock transformers' `generate` on it.

`pixels` is the original `Blip2ImageEvalProcessor` written out (bicubic squash, ToTensor, CLIP Normalize);
`reference_embeds` is `Chat.get_context_emb` (the prompt split at `<ImageHere>`, each segment tokenized on its own
with SentencePiece, BOS on the first only, each image's 32 projected Q-Former outputs spliced in between);
`plain_generate` is `LlamaForCausalLM.generate` on those embeddings. Tests compare the engine's answers to these.
"""

from __future__ import annotations

import io

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from transformers import GenerationConfig

from skingpt4.folder.tiny import train_tiny_sentencepiece

PLACEHOLDER = "<ImageHere>"  # written here, not imported: the reference splits where the released code splits
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_sentencepiece() -> spm.SentencePieceProcessor:
    """The tiny model's tokenizer as the original code used it: SentencePiece itself."""
    return spm.SentencePieceProcessor(model_proto=train_tiny_sentencepiece())


def full_length_ids(sp: spm.SentencePieceProcessor, image_token_id: int) -> list[int]:
    """Ids to suppress, in the engine and the reference alike, so that answers run their full length: the image
    placeholder, every piece with '#' and EOS, and byte/control pieces (without those the random model writes
    mostly bytes that decode to U+FFFD, the next prompt tokenizes the answer differently, and no turn could reuse
    the cache of generated tokens)."""
    pieces = range(sp.get_piece_size())
    hashes = [i for i in pieces if "#" in sp.id_to_piece(i)]
    assert hashes  # otherwise the tiny model could stop early and fewer steps would be compared
    odd = [i for i in pieces if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)]
    return sorted({image_token_id, *hashes, sp.eos_id(), *odd})


def pixels(data: bytes, size: int) -> torch.Tensor:
    """The original `Blip2ImageEvalProcessor`, by hand: bicubic squash, ToTensor, CLIP Normalize."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@torch.no_grad()
def reference_embeds(model, sp, prompt: str, photos: list[bytes], size: int) -> torch.Tensor:
    """`Chat.get_context_emb` of the released code on photos given as files: their pixels by the transform written
    out above, their projected Q-Former outputs by the model, then `splice`."""
    features = None
    if photos:
        features = model.get_image_features(pixel_values=torch.stack([pixels(p, size) for p in photos])).pooler_output
    return splice(model.language_model.get_input_embeddings(), sp, prompt, features)


def reference_ids(sp, prompt: str, image_token_id: int, slots: int = 32) -> list[int]:
    """The prompt's ids as the model reads them, by the released code's split: per-segment SentencePiece ids (BOS
    on segment 0 only) with each image's `slots` positions between the segments."""
    segments = prompt.split(PLACEHOLDER)
    ids = [sp.bos_id()]
    for i, segment in enumerate(segments):
        ids += sp.encode(segment) + ([image_token_id] * slots if i < len(segments) - 1 else [])
    return ids


@torch.no_grad()
def splice(embed, sp, prompt: str, features: torch.Tensor | None) -> torch.Tensor:
    """The released code's splice, by hand: the prompt split at `<ImageHere>`, per-segment SentencePiece ids (BOS
    on segment 0 only) embedded by `embed`, each image's 32 features (`features[i]`) between the segments."""
    segments = prompt.split(PLACEHOLDER)
    assert len(segments) == (0 if features is None else len(features)) + 1
    pieces = []
    for i, segment in enumerate(segments):
        ids = ([sp.bos_id()] if i == 0 else []) + sp.encode(segment)
        pieces.append(embed(torch.tensor([ids])))
        if i < len(segments) - 1:
            pieces.append(features[i : i + 1])
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def plain_generate(model, embeds, suppressed, sp, **options):
    """Stock transformers, nothing of the engine: `LlamaForCausalLM.generate` on the embeddings."""
    config = GenerationConfig(
        do_sample=False,
        suppress_tokens=suppressed,
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.eos_id(),
        pad_token_id=sp.eos_id(),
        **options,
    )
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return model.language_model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        generation_config=config,
        return_dict_in_generate=True,
        output_logits=True,
    )


def plain_answer_ids(loaded, sp, prompt: str, photos: list[bytes], suppressed, **options) -> list[int]:
    """The new ids plain transformers generates for this prompt (from `Conversation.prompt()`) and photos."""
    embeds = reference_embeds(loaded.model, sp, prompt, photos, loaded.info.meta.image_size)
    return plain_generate(loaded.model, embeds, suppressed, sp, **options).sequences[0].tolist()
