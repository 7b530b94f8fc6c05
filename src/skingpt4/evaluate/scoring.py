"""Choice mode of the evaluation: score every candidate label by the log-likelihood of the answer sentence naming it.

The sentence is the step-2 training target, "This could be a skin disease image of <label>." plus the template's
stop string, after the same chat prompt the engine builds; see evaluate.py for why the score is not
length-normalised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from skingpt4.engine.settings import GenerationSettings
from skingpt4.evaluate import synonyms as S

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

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
def score_labels(engine: Engine, features: torch.Tensor, labels: list[str], question: str) -> torch.Tensor:
    """(images, labels) summed log-probabilities of "This could be a skin disease image of <label>." + stop,
    each after the chat prompt for its image and `question`: one sequence per (image, label), right-padded."""
    targets = [_target_ids(engine, label) for label in labels]
    prompts = [_prompt(engine, feature, question, max(map(len, targets))) for feature in features]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(labels))]
    scores = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    for start in range(0, len(pairs), ROWS_PER_FORWARD):
        chunk = pairs[start : start + ROWS_PER_FORWARD]
        rows = [(prompts[i][0], prompts[i][1], targets[j]) for i, j in chunk]
        for (i, j), value in zip(chunk, engine.score(rows)):
            scores[i, j] = value
    return scores


def _target_ids(engine: Engine, label: str) -> list[int]:
    """The sentence as the model would write it: tokenized on its own (as in training), stop string included."""
    template, tokenizer = engine.chat.template, engine.chat.tokenizer
    ids = tokenizer(ANSWER_FORMAT.format(spoken(label)) + (template.stop or ""), add_special_tokens=False).input_ids
    return ids if template.stop else [*ids, engine.chat.end_id]


def _prompt(engine: Engine, feature: torch.Tensor, question: str, room: int) -> tuple[list[int], list]:
    """The prompt ids and photos of a one-question chat, laid out by the engine's own chat format."""
    session = engine.session()
    session.add_encoded(feature)
    session.ask(question)
    ids, photos, _ = engine.chat.prompt(session, GenerationSettings.greedy(max_new_tokens=room))
    if not photos:
        raise ValueError("the prompt lost its image to the context budget")
    return ids, photos
