"""Choice mode of the evaluation: score every candidate label by the log-likelihood of the answer sentence naming it.

The sentence is the step-2 training target, "This could be a skin disease image of <label>." plus the template's
stop string, after the same chat prompt the engine builds; see evaluate.py for why the score is not
length-normalised.
"""

from __future__ import annotations

import torch

from skingpt4.chat import ChatEngine
from skingpt4.errors import InputError
from skingpt4.evaluate import synonyms as S
from skingpt4.generation import GenerationSettings

ANSWER_FORMAT = "This could be a skin disease image of {}."  # the step-2 training target (docs/reference.md §3.4)
ROWS_PER_FORWARD = 64  # (image, candidate) sequences per forward pass


def spoken(label: str) -> str:
    """How the answer sentence names a label: the table's spoken name for codes ("mel" -> "melanoma")."""
    text = " ".join(label.replace("-", " ").replace("_", " ").split())
    concept = S.table().concepts.get(S.table().by_name.get(S.norm(label), ""))
    if concept is not None and (concept.say or len(text) <= 5):
        return concept.say or concept.name
    return text


@torch.no_grad()
def score_labels(engine: ChatEngine, features: torch.Tensor, labels: list[str], question: str) -> torch.Tensor:
    """(images, labels) summed log-probabilities of "This could be a skin disease image of <label>." + stop,
    each after the chat prompt for its image and `question`: one sequence per (image, label), right-padded."""
    targets = [_target_ids(engine, label) for label in labels]
    prompts = [_prompt(engine, feature, question, max(map(len, targets))) for feature in features]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(labels))]
    scores = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    for start in range(0, len(pairs), ROWS_PER_FORWARD):
        chunk = pairs[start : start + ROWS_PER_FORWARD]
        rows = [(prompts[i][0], prompts[i][1], targets[j]) for i, j in chunk]
        for (i, j), value in zip(chunk, _sequence_logprobs(engine, rows)):
            scores[i, j] = value
    return scores


def _target_ids(engine: ChatEngine, label: str) -> list[int]:
    """The sentence as the model would write it: tokenized on its own (as in training), stop string included."""
    text = ANSWER_FORMAT.format(spoken(label)) + (engine.template.stop or "")
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    return ids if engine.template.stop else [*ids, engine.tokenizer.eos_token_id]


def _prompt(engine: ChatEngine, feature: torch.Tensor, question: str, room: int) -> tuple[list[int], torch.Tensor]:
    """The prompt ids and image features of a one-question chat, laid out by the chat engine itself."""
    session = engine.session()
    session.add_encoded(feature)
    session.ask(question)
    ids, features, _ = engine.prepare(session, GenerationSettings.greedy(max_new_tokens=room))
    if features is None:
        raise ValueError("the prompt lost its image to the context budget")
    return ids, features


NEEDS_TRANSFORMERS = "reads the LLM's hidden states: run it without --quantize (open mode works)"


def _sequence_logprobs(engine: ChatEngine, rows: list[tuple[list[int], torch.Tensor, list[int]]]) -> list[float]:
    """Sum of log P(target token | everything before it) for each (prompt ids, image features, target ids)."""
    if engine.loaded.llm is not None:
        raise InputError(f"choice scoring {NEEDS_TRANSFORMERS}")
    device, pad = engine.loaded.device, engine.tokenizer.pad_token_id
    width = max(len(p) + len(t) for p, _, t in rows)
    ids = torch.tensor([[*p, *t] + [pad] * (width - len(p) - len(t)) for p, _, t in rows], device=device)
    mask = torch.tensor([[1] * (len(p) + len(t)) + [0] * (width - len(p) - len(t)) for p, _, t in rows], device=device)
    lm = engine.model.language_model
    with engine.lock:  # the model is shared with every other caller of the engine
        embeds = engine.embed(ids, torch.cat([f for _, f, _ in rows]))
        hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # Only the positions that predict target tokens go through the LM head (the full logits would be B x T x V).
    at = [(n, len(p) - 1 + k) for n, (p, _, t) in enumerate(rows) for k in range(len(t))]
    rows_idx = torch.tensor([n for n, _ in at], device=device)
    logits = lm.get_output_embeddings()(hidden[rows_idx, torch.tensor([k for _, k in at], device=device)]).float()
    logits[:, len(engine.tokenizer) :] = float("-inf")  # ids without a token are never generated either
    wanted = torch.tensor([t[k] for _, _, t in rows for k in range(len(t))], device=device)
    logp = torch.log_softmax(logits, -1).gather(1, wanted[:, None])[:, 0].double().cpu()
    sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, rows_idx.cpu(), logp)
    return sums.tolist()
