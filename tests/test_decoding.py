"""The per-step stop check and never-generate mask (`engine/decoding.py`) against independent references.

The stop check must stop at the first token after which the *decoded* text contains a stop string, the question
answered here by decoding every prefix with the tokenizer (and, for ASCII stops, by transformers' own
`StopStringCriteria`); the mask must change scores exactly as transformers' `suppress_tokens` plus a slice would.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import endless
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skingpt4.engine.decoding import BYTE_LEVEL, Forbid, StopWhen, TokenBytes
from skingpt4.engine.sampler import generation_config
from skingpt4.engine.settings import GenerationSettings

STOPS = ["###", "#", "##", "end.", " the", "é", "日本"]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded.tokenizer


@pytest.fixture(scope="module")
def words(tok) -> list[int]:
    """Ids of ordinary pieces (no byte pieces, no special tokens)."""
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return [i for i, p in enumerate(pieces) if i not in special and not p.startswith("<0x")]


@pytest.fixture(scope="module")
def chunks(tok) -> list[list[int]]:
    """Short id runs that build the stops piece by piece: `#`, `##`, `e` `n` `d` `.`, and whole characters made
    of byte pieces (é, 日, 本), so that stops split across tokens are common in the drawn sequences."""
    pieces = ["#", "##", "###", ".###", "e", "n", "d", ".", "▁e", "▁the", "th", "▁"]
    runs = [[i] for i in tok.convert_tokens_to_ids(pieces)]
    for char in "éé日本":
        runs.append(tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()]))
    return runs


def draw_ids(data, words, chunks, size=30) -> list[int]:
    runs = data.draw(
        st.lists(
            st.one_of(st.sampled_from(chunks), st.sampled_from(words).map(lambda i: [i])), min_size=1, max_size=size
        )
    )
    return [i for run in runs for i in run]


def first_decoded_stop(tok, ids: list[int], stop: str) -> int | None:
    """Reference: the first k at which decode(ids[:k]) contains `stop`."""
    for k in range(1, len(ids) + 1):
        if stop in tok.decode(ids[:k], skip_special_tokens=True):
            return k
    return None


def first_checked_stop(criterion, ids: list[int]) -> int | None:
    for k in range(1, len(ids) + 1):
        if bool(criterion(torch.tensor([ids[:k]]))[0]):
            return k
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), stop=st.sampled_from(STOPS))
def test_stops_at_the_first_token_whose_text_holds_the_stop(tok, words, chunks, data, stop):
    ids = draw_ids(data, words, chunks)
    criterion = StopWhen(TokenBytes(tok), [stop])
    assert first_checked_stop(criterion, ids) == first_decoded_stop(tok, ids, stop)


def test_a_stop_split_across_tokens_and_byte_pieces_is_found(tok):
    pieces = TokenBytes(tok)
    hashes = tok.convert_tokens_to_ids(["#"] * 3)
    ids = tok("well", add_special_tokens=False).input_ids + hashes
    assert first_checked_stop(StopWhen(pieces, ["###"]), ids) == len(ids)
    e_acute = tok.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])  # é by byte fallback, one byte per token
    ids = tok("caf", add_special_tokens=False).input_ids + e_acute
    assert first_checked_stop(StopWhen(pieces, ["é"]), ids) == len(ids)
    assert tok.decode(ids) == "café"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), stop=st.sampled_from(["###", "end.", "##", "e.#"]))
def test_agrees_with_transformers_stop_string_criteria(tok, words, chunks, data, stop):
    from transformers.generation.stopping_criteria import StopStringCriteria

    reference, ours = StopStringCriteria(tok, [stop]), StopWhen(TokenBytes(tok), [stop])
    ascii_chunks = [run for run in chunks if len(run) == 1]
    batch = torch.tensor([draw_ids(data, words, ascii_chunks, 25)])
    for k in range(1, batch.shape[1] + 1):
        assert bool(ours(batch[:, :k])[0]) == bool(reference(batch[:, :k], None)[0]), batch[0, :k].tolist()


def test_rows_are_checked_on_their_own_and_cancel_stops_all(tok):
    rows = [tok("a ###", add_special_tokens=False).input_ids, tok("a bcd", add_special_tokens=False).input_ids]
    width = max(map(len, rows))
    batch = torch.tensor([[tok.eos_token_id] * (width - len(r)) + r for r in rows])
    cancel = threading.Event()
    criterion = StopWhen(TokenBytes(tok), ["###"], cancel)
    assert criterion(batch).tolist() == [True, False]
    cancel.set()
    assert criterion(batch).tolist() == [True, True]
    assert StopWhen(TokenBytes(tok), [], cancel)(batch).tolist() == [True, True]


def test_each_token_is_decoded_once_per_tokenizer(tok):
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def decode(self, *args, **kwargs):
            calls.append(args)
            return self.inner.decode(*args, **kwargs)

    pieces = TokenBytes(Counting(tok))
    ids = torch.tensor([tok("one two one two ###", add_special_tokens=False).input_ids])
    setup = len(calls)
    for _ in range(3):  # three generate calls, each with its own criterion
        criterion = StopWhen(pieces, ["###", "two"])
        for k in range(1, ids.shape[1] + 1):
            criterion(ids[:, :k])
    assert len(calls) - setup == len(set(ids[0].tolist())) + 1  # and the first id as an answer's first token


def test_byte_level_pieces_are_their_bytes():
    """GPT-2's byte-level alphabet: 256 distinct characters, printable ASCII mapped to itself."""
    assert len(BYTE_LEVEL) == 256 and sorted(BYTE_LEVEL.values()) == list(range(256))
    assert BYTE_LEVEL["#"] == ord("#") and BYTE_LEVEL["Ġ"] == ord(" ")
    assert bytes(BYTE_LEVEL[c] for c in "Ã©") == "é".encode()


def test_mask_equals_suppress_tokens_and_a_slice():
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    suppressed, first_untokenized = [0, 7, 31], 40
    reference = SuppressTokensLogitsProcessor(suppressed)(None, scores.clone())
    reference[:, first_untokenized:] = float("-inf")
    mask = torch.zeros(50, dtype=torch.bool)
    mask[suppressed] = True
    mask[first_untokenized:] = True
    assert torch.equal(Forbid(mask)(None, scores.clone()), reference)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_sampling_with_the_mask_equals_transformers_suppress_tokens(engine):
    """Under sampling the mask sits where `suppress_tokens` would: after the repetition penalty, before
    temperature and top-p. Same seed, same ids as plain `generate` with `suppress_tokens`."""
    session = engine.session()
    session.ask("Describe a rash.")
    settings = GenerationSettings(
        max_new_tokens=24, temperature=0.8, top_p=0.7, repetition_penalty=1.3, seed=5, stop=("zzz",)
    )
    ids, _, _ = engine.chat.prompt(session, settings)
    endless(engine)  # no '#' and no EOS: both run all 24 steps
    row = torch.tensor([ids])
    config = generation_config(settings, engine.tokenizer, engine.suppress_tokens)
    torch.manual_seed(5)
    plain = engine.model.language_model.generate(
        inputs_embeds=engine.embed(row, None), attention_mask=torch.ones_like(row), generation_config=config
    )[0]
    session.answer(settings)
    assert session.completion_tokens == len(plain) == 24
    assert session.cache_keys[len(ids) :] == plain.tolist()[:-1]
