"""Token ids with image slots, compared with SentencePiece run by hand; truncation never halves an image."""

from __future__ import annotations

import sentencepiece as spm

from skingpt4.folder.tiny import build_tiny_tokenizer, train_tiny_sentencepiece
from skingpt4.inputs.conversation import Conversation, get_template
from skingpt4.inputs.prompt import common_prefix, image_keys, prompt_ids, truncate_left

IMG = 999


def test_prompt_ids_equal_per_segment_sentencepiece():
    tok = build_tiny_tokenizer()
    sp = spm.SentencePieceProcessor(model_proto=train_tiny_sentencepiece())
    conv = Conversation(get_template("skingpt4"))
    conv.add_image()
    conv.add_question("What's wrong with my skin? 123 ünïcode")
    conv.add_answer("Psoriasis.")
    conv.add_image()
    conv.add_question("And this one?")
    head, middle, tail = conv.prompt().split("<ImageHere>")
    expected = [1, *sp.encode(head), *[IMG] * 32, *sp.encode(middle), *[IMG] * 32, *sp.encode(tail)]
    assert prompt_ids(tok, conv.prompt(), IMG) == expected


def test_truncate_left_keeps_the_tail_and_whole_images():
    ids = [1, 5, 6, *[IMG] * 4, 7, 8, *[IMG] * 4, 9]
    assert truncate_left(ids, 100, IMG) == (ids, 0)
    assert truncate_left(ids, 12, IMG) == (ids[2:], 0)  # cut in text: exactly the budget
    kept, dropped = truncate_left(ids, 10, IMG)  # the cut would fall inside the first image block
    assert kept == [7, 8, *[IMG] * 4, 9] and dropped == 1
    kept, dropped = truncate_left(ids, 3, IMG)  # inside the second block: it goes too
    assert kept == [9] and dropped == 2


def test_image_keys_distinguish_images_and_common_prefix():
    ids = [1, IMG, IMG, 4, IMG, IMG, 5]
    assert image_keys(ids, IMG) == [1, -1, -1, 4, -2, -2, 5]
    assert image_keys(ids, IMG, first_image=1) == [1, -2, -2, 4, -3, -3, 5]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def test_adjacent_image_blocks_stay_two_images():
    """Two images with no text between them are two blocks of NUM_QUERY_TOKENS, not one long block."""
    n = 3
    ids = [1, 7, *[IMG] * n, *[IMG] * n, 8, *[IMG] * n, 9]
    assert image_keys(ids, IMG, num_query_tokens=n) == [1, 7, -1, -1, -1, -2, -2, -2, 8, -3, -3, -3, 9]
    assert image_keys(ids, IMG, first_image=2, num_query_tokens=n)[2:8] == [-3, -3, -3, -4, -4, -4]
    # A cut at the boundary between the two adjacent blocks keeps the second whole and counts one dropped.
    assert truncate_left(ids, len(ids) - 5, IMG, num_query_tokens=n) == (ids[5:], 1)
    # A cut inside the second block drops it too: two blocks gone, the third kept.
    assert truncate_left(ids, len(ids) - 6, IMG, num_query_tokens=n) == (ids[8:], 2)
