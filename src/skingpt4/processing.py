"""Prompt string -> token ids with image slots, exactly as the released code lays them out.

The original splits the prompt at each `<ImageHere>`, tokenizes every text segment on its own (BOS only on the
first; SentencePiece's leading space on every segment), and splices 32 image embeddings between segments. We build
the same sequence as ids, with 32 copies of the image placeholder id where the embeddings go; the model scatters
the projected image features into those positions.
"""

from __future__ import annotations

from skingpt4.conversation import IMAGE_PLACEHOLDER
from skingpt4.model import NUM_QUERY_TOKENS


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


def truncate_left(ids: list[int], budget: int, image_token_id: int) -> tuple[list[int], int]:
    """Keep the last `budget` ids, as the original does, but never cut an image block in half.

    Returns the kept ids and how many whole image blocks were dropped from the left (their features go too).
    """
    if budget <= 0:
        raise ValueError(f"context budget must be positive, got {budget}")
    cut = max(0, len(ids) - budget)
    while 0 < cut < len(ids) and ids[cut] == image_token_id and ids[cut - 1] == image_token_id:
        cut += 1  # inside an image block: drop the rest of it as well
    dropped = ids[:cut]
    blocks = sum(1 for i, t in enumerate(dropped) if t == image_token_id and (i == 0 or dropped[i - 1] != t))
    return ids[cut:], blocks


def image_keys(ids: list[int], image_token_id: int, first_image: int = 0) -> list[int]:
    """The ids with each image block's positions replaced by a per-image negative key.

    Two prompts share a key/value-cache prefix only where both the text and the images agree; comparing these keys
    (not the ids, where every image looks alike) finds that prefix.
    """
    keys, image = [], first_image - 1
    for i, t in enumerate(ids):
        if t == image_token_id:
            if i == 0 or ids[i - 1] != image_token_id:
                image += 1
            keys.append(-(image + 1))
        else:
            keys.append(t)
    return keys


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
