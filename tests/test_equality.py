"""Long answers, many turns: prefix reuse and beam search against plain transformers on independent embeddings.

The engine answers a four-turn consultation (a second image arrives mid-chat) with 80-token greedy answers, once
reusing its key/value cache and once recomputing every turn from scratch. Both must give the same token ids as a
plain `LlamaForCausalLM.generate` on prompt embeddings spliced here by hand as the released `Chat.get_context_emb`
does (the prompt split at `<ImageHere>`, every segment tokenized on its own with SentencePiece, BOS only on the
first, image features spliced in between), and the same per-step logits within 1e-4. The logits are checked a
second time against one cache-free forward pass over prompt and answer. Beam search (3 beams) must give the same
ids as plain `generate(num_beams=3)` on the same embeddings.

The tiny random model would soon write `#` (the stop string) or EOS; both are suppressed, here and in the
reference alike, so that every answer runs its full length and every step is compared.
"""

from __future__ import annotations

import pytest
import torch
from conftest import image_bytes
from plain_reference import full_length_ids, plain_generate, reference_embeds, tiny_sentencepiece

from skingpt4.backends.transformers_llm import load_model
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import EngineSettings, GenerationSettings

TOL = 1e-4
LONG = 80  # new tokens per answer
# (image added before the question, question): the second image comes with the third question
TURNS = [
    (image_bytes(noise_seed=21), "What's wrong with my skin?"),
    (None, "What causes it?"),
    (image_bytes(noise_seed=22), "And this second photo, is it the same thing?"),
    (None, "What treatment and medication should be recommended for this case?"),
]


@pytest.fixture(scope="module")
def loaded32(tiny_dir):
    return load_model(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sp():
    return tiny_sentencepiece()


@pytest.fixture(scope="module")
def suppressed(loaded32, sp) -> list[int]:
    return full_length_ids(sp, loaded32.image_token_id)


@pytest.fixture(params=[1, 8], ids=["max_batch 1", "max_batch 8"])
def probe(loaded32, suppressed, monkeypatch, request):
    """An engine that answers one at a time, and one that batches (a lone turn is a batch of one in both)."""
    engine = ChatEngine(loaded32, settings=EngineSettings(max_batch=request.param))
    engine.suppress_tokens = list(suppressed)
    recorder = Probe(engine, monkeypatch)
    yield recorder
    recorder.handle.remove()


class Probe:
    """Watches an engine: the new ids of each generate run, and per forward pass of the language model the number
    of positions it computed and the logits of its last position (one pass per generated token)."""

    def __init__(self, engine: ChatEngine, monkeypatch):
        self.engine, self.runs, self.forwards = engine, [], []
        run = engine._new_ids

        def recording_run(*args, **kwargs):
            first = len(self.forwards)
            new = run(*args, **kwargs)
            self.runs.append(([list(n) for n in new], self.forwards[first:]))
            return new

        def hook(module, args, kwargs, output):
            given = kwargs.get("inputs_embeds")
            given = kwargs["input_ids"] if given is None else given
            self.forwards.append((given.shape[1], output.logits[:, -1].detach().clone()))

        monkeypatch.setattr(engine, "_new_ids", recording_run)
        self.handle = engine.model.language_model.register_forward_hook(hook, with_kwargs=True)


def consult(probe: Probe, settings: GenerationSettings, recompute: bool, settle: bool = False) -> list[dict]:
    """Run TURNS through one session; per turn: the prompt, its photos, the new ids and the engine's step logits.

    `settle`: after each answer the session's cache is brought up to the re-tokenized conversation (as the chat
    and the web app do while the person types); "settled" is how many prompt positions that covered."""
    session = probe.engine.session()
    photos, turns, settled = [], [], 0
    for photo, question in TURNS:
        if photo is not None:
            session.add_image(photo)
            photos.append(photo)
        session.ask(question)
        prompt = session.conversation.prompt()
        if recompute:
            session.cache = None
        session.answer(settings)
        ((new, forwards),) = probe.runs  # exactly one generate run per turn
        turns.append(
            {
                "prompt": prompt,
                "photos": list(photos),
                "ids": new[0],
                "reused": session.reused_tokens,
                "prompt_tokens": session.prompt_tokens,
                "widths": [w for w, _ in forwards],
                "logits": torch.cat([logits for _, logits in forwards]),
                "settled_before": settled,
            }
        )
        probe.runs.clear()
        if settle:
            settled = session.cache.get_seq_length() if session.settle() else 0
    return turns


def test_long_multi_turn_reuse_equals_recompute_and_plain_transformers(probe, loaded32, sp, suppressed, capsys):
    model, size = loaded32.model, loaded32.info.meta.image_size
    greedy = GenerationSettings.greedy(max_new_tokens=LONG)
    cached = consult(probe, greedy, recompute=False)
    fresh = consult(probe, greedy, recompute=True)
    settled = consult(probe, greedy, recompute=False, settle=True)
    report = []
    for n, (c, f, s) in enumerate(zip(cached, fresh, settled)):
        assert s["ids"] == c["ids"] and (s["logits"] - c["logits"]).abs().max().item() <= TOL, f"turn {n}"
        # settling covered the re-tokenized history and the next role's first word, so the turn computed only the
        # new text
        assert s["reused"] >= max(s["settled_before"], c["reused"]), f"turn {n}"
        assert c["prompt"] == f["prompt"]  # same answers so far, so the same conversation
        # the cache really carried the prefix: later turns computed only the positions after it
        if n == 0:
            assert c["reused"] == 0 and c["widths"][0] == c["prompt_tokens"]
        else:
            assert c["reused"] > 0 and c["widths"][0] == c["prompt_tokens"] - c["reused"] < c["prompt_tokens"]
        assert f["reused"] == 0 and f["widths"][0] == f["prompt_tokens"]
        assert c["widths"][1:] == f["widths"][1:] == [1] * (LONG - 1)  # one position per later step

        embeds = reference_embeds(model, sp, c["prompt"], c["photos"], size)
        assert embeds.shape[1] == c["prompt_tokens"]
        plain = plain_generate(model, embeds, suppressed, sp, max_new_tokens=LONG)
        expected_ids = plain.sequences[0].tolist()
        expected_logits = torch.cat(plain.logits)
        assert len(expected_ids) == LONG  # the answer ran its full length: LONG steps compared
        assert c["ids"] == f["ids"] == expected_ids, f"turn {n}"
        assert c["logits"].shape == f["logits"].shape == expected_logits.shape == (LONG, expected_logits.shape[-1])
        cached_diff = (c["logits"] - expected_logits).abs().max().item()
        fresh_diff = (f["logits"] - expected_logits).abs().max().item()
        assert cached_diff <= TOL and fresh_diff <= TOL, f"turn {n}"

        # once more without any cache and without generate: one forward pass over the prompt and the answer
        with torch.no_grad():
            answer = model.language_model.get_input_embeddings()(torch.tensor([expected_ids]))
            full = model.language_model(inputs_embeds=torch.cat([embeds, answer], dim=1)).logits[0]
        forward_diff = (c["logits"] - full[embeds.shape[1] - 1 : -1]).abs().max().item()
        assert forward_diff <= TOL, f"turn {n}"
        report.append(
            (
                n,
                c["prompt_tokens"],
                c["reused"],
                s["reused"],
                len(set(c["ids"])),
                cached_diff,
                fresh_diff,
                forward_diff,
            )
        )
    assert len(cached[2]["photos"]) == 2  # the second image came mid-chat and was in the prompt
    assert sum(s["reused"] > c["reused"] for c, s in zip(cached, settled)) >= 2  # settling kept more, twice or more
    # some turn reused cache entries of generated tokens, not only of the previous prompt
    assert any(c["reused"] > before["prompt_tokens"] for before, c in zip(cached, cached[1:]))
    with capsys.disabled():
        for n, prompt, reused, settled_reuse, distinct, cd, fd, wd in report:
            print(
                f"\nturn {n}: prompt {prompt} tokens, reused {reused} ({settled_reuse} settled), {LONG} ids equal "
                f"({distinct} distinct); "
                f"max |logit diff| vs plain generate: cached {cd:.2e}, recomputed {fd:.2e}; vs one forward {wd:.2e}",
                end="",
            )
        print()


def test_beam_search_equals_plain_transformers(probe, loaded32, sp, suppressed):
    """num_beams=3, no sampling, three turns (two images): the engine's ids are plain generate(num_beams=3)'s."""
    model, size = loaded32.model, loaded32.info.meta.image_size
    beams = GenerationSettings(do_sample=False, num_beams=3, max_new_tokens=40)
    session = probe.engine.session()
    photos, differs_from_greedy = [], []
    for photo, question in TURNS[:3]:
        if photo is not None:
            session.add_image(photo)
            photos.append(photo)
        session.ask(question)
        prompt = session.conversation.prompt()
        session.answer(beams)
        ((new, _),) = probe.runs
        probe.runs.clear()
        embeds = reference_embeds(model, sp, prompt, photos, size)
        expected = plain_generate(model, embeds, suppressed, sp, max_new_tokens=40, num_beams=3).sequences[0]
        assert len(expected) == 40
        assert new[0] == expected.tolist()
        greedy = plain_generate(model, embeds, suppressed, sp, max_new_tokens=40).sequences[0]
        differs_from_greedy.append(greedy.tolist() != expected.tolist())
    assert session.cache is None  # beams take the batch path: no cache reuse
    assert any(differs_from_greedy)  # guard for the test itself: here beam search finds other answers than greedy
