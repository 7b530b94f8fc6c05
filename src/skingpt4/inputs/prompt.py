"""Prompt string -> token ids with image slots, exactly as the released code lays them out.

The original splits the prompt at each `<ImageHere>`, tokenizes every text segment on its own (BOS only on the
first; SentencePiece's leading space on every segment), and splices 32 image embeddings between segments. We build
the same sequence as ids, with 32 copies of the image placeholder id where the embeddings go; the model scatters
the projected image features into those positions.
"""

from __future__ import annotations

from skingpt4.folder.meta import NUM_QUERY_TOKENS
from skingpt4.inputs.conversation import IMAGE_PLACEHOLDER


def prompt_ids(tokenizer, prompt: str, image_token_id: int, num_query_tokens: int = NUM_QUERY_TOKENS) -> list[int]:
    """Token ids of `prompt`, one block of `num_query_tokens` placeholder ids per `<ImageHere>`."""
    segments = prompt.split(IMAGE_PLACEHOLDER)
    ids = [tokenizer.bos_token_id]
    for i, segment in enumerate(segments):
        if i > 0:
            ids.extend([image_token_id] * num_query_tokens)
        # User text had special-token strings removed (conversation.neutralise), so it cannot yield control ids.
        ids.extend(tokenizer(segment, add_special_tokens=False).input_ids)
    return ids


def one_slot_per_image(ids: list[int], image_token_id: int, num_query_tokens: int = NUM_QUERY_TOKENS) -> list[int]:
    """`ids` with each image block folded to one placeholder id: how vLLM takes a prompt (its skingpt4 plugin
    unfolds every `<image>` back to `num_query_tokens` slots in place, `backends/vllm_model.py`)."""
    return [t for t, offset in zip(ids, block_offsets(ids, image_token_id, num_query_tokens)) if offset <= 0]


def truncate_left(
    ids: list[int], budget: int, image_token_id: int, num_query_tokens: int = NUM_QUERY_TOKENS
) -> tuple[list[int], int]:
    """Keep the last `budget` ids, as the original does, but never cut an image block in half.

    Returns the kept ids and how many whole image blocks were dropped from the left (their features go too).
    """
    if budget <= 0:
        raise ValueError(f"context budget must be positive, got {budget}")
    offsets = block_offsets(ids, image_token_id, num_query_tokens)
    cut = max(0, len(ids) - budget)
    while 0 < cut < len(ids) and offsets[cut] > 0:
        cut += 1  # inside an image block: drop the rest of it as well
    return ids[cut:], offsets[:cut].count(0)


def image_keys(ids: list[int], image_token_id: int, first_image: int = 0, num_query_tokens: int = NUM_QUERY_TOKENS):
    """The ids with each image block's positions replaced by a per-image negative key.

    Two prompts share a key/value-cache prefix only where both the text and the images agree; comparing these keys
    (not the ids, where every image looks alike) finds that prefix.
    """
    keys, image = [], first_image - 1
    for t, offset in zip(ids, block_offsets(ids, image_token_id, num_query_tokens)):
        image += offset == 0
        keys.append(-(image + 1) if offset >= 0 else t)
    return keys


def block_offsets(ids: list[int], image_token_id: int, num_query_tokens: int = NUM_QUERY_TOKENS) -> list[int]:
    """Each position's offset inside its image block (0 starts a block), -1 for text.

    Blocks are counted by length, not by runs: two images with no text between them are two blocks.
    """
    offsets, run = [], 0
    for t in ids:
        run = run + 1 if t == image_token_id else 0
        offsets.append((run - 1) % num_query_tokens if run else -1)
    return offsets


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
