"""Training data: manifest records checked up front, the original's token layout, a resumable sample order.

Token layout of one sample (docs/reference.md §4.1), as ids with 32 image placeholders where the features go:

    [BOS] "###Human: <Img>" [32 x <image>] "</Img> <question> ###Assistant: " | "<caption>###"
    labels: -100 ...................................................... | caption ids (pad/eos ids -> -100)

The prompt part comes from `processing.prompt_ids` (per-segment tokenization, BOS once), the target is tokenized
without BOS and cut at `max_txt_len`. The sample order is a pure function of (seed, position), so a checkpoint only
needs the number of batches consumed to resume exactly, with any number of data-loading workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from skingpt4.data.manifest import read_manifest, read_minigpt4
from skingpt4.errors import InputError
from skingpt4.inputs.conversation import IMAGE_PLACEHOLDER
from skingpt4.inputs.images import ImageRejected, load_image
from skingpt4.inputs.prompt import prompt_ids


@dataclass(frozen=True)
class Record:
    image: Path
    caption: str


# ---------------------------------------------------------------------------------------------------------------
# Records and prompts, checked before the first step


def read_records(data: str | Path, split: str, default_split: bool) -> list[Record]:
    """The records of `split` (plus those without a split when `default_split`); bad records are errors."""
    path = Path(data)
    if path.is_dir() and (path / "filter_cap.json").is_file():
        rows = [(path / row["image"], row) for row in read_minigpt4(path)]
    elif path.is_file():
        rows = [(item.path, item.manifest) for item in read_manifest(path)]
    else:
        raise InputError(f"training data not found: {data} (a manifest .jsonl/.csv or a folder with filter_cap.json)")
    records = []
    for number, (image, fields) in enumerate(rows, 1):
        if fields.get("exclude"):  # flagged unusable by `prepare-data`
            continue
        if (fields.get("split") or (split if default_split else None)) != split:
            continue
        if "caption" not in fields:
            raise InputError(f"{path.name} record {number}: no 'caption' field (training needs image and caption)")
        caption = fields["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"{path.name} record {number} ({Path(image).name}): empty caption")
        records.append(Record(Path(image), caption))
    missing = [r.image for r in records if not r.image.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"{path.name}: image not found: {missing[0]}{more}")
    return records


def load_prompts(name: str, template: str) -> list[str]:
    """The original's prompt list: lines holding `<ImageHere>`, each put into the template."""
    path = Path(name)
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"prompt file not found: {name}")
        text = path.read_text(encoding="utf-8")
    else:
        packaged = resources.files("skingpt4") / "prompts" / f"{name}.txt"
        if not packaged.is_file():
            raise InputError(f"no packaged prompt list {name!r} (alignment, alignment_skin, alignment_concept)")
        text = packaged.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if IMAGE_PLACEHOLDER in line]
    if not lines:
        raise InputError(f"prompt list {name!r} has no line with {IMAGE_PLACEHOLDER}")
    if any(line.count(IMAGE_PLACEHOLDER) != 1 for line in lines):
        raise InputError(f"prompt list {name!r}: each line must hold {IMAGE_PLACEHOLDER} exactly once")
    return [template.format(line) for line in lines]


# ---------------------------------------------------------------------------------------------------------------
# Samples: keys in, tensors out


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by keys `(pass, index, prompt)`; the crop of a training image depends only on (seed, pass, index)."""

    def __init__(self, records, prompts, tokenizer, image_token_id, end_sym, max_txt_len, pixels, seed, train):
        self.records, self.tokenizer, self.train, self.seed = records, tokenizer, train, seed
        self.end_sym, self.max_txt_len, self.pixels = end_sym, max_txt_len, pixels
        self.prompt_ids = [prompt_ids(tokenizer, p, image_token_id) for p in prompts]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, index, prompt = key
        record = self.records[index]
        try:
            image = load_image(record.image)
        except (ImageRejected, OSError) as exc:
            raise InputError(f"cannot read training image {record.image}: {exc}") from None
        if self.train:
            pixels = self.pixels.train(image, np.random.default_rng([self.seed, epoch, index]))
        else:
            pixels = self.pixels.eval(image)
        ids, labels = self.encode(self.prompt_ids[prompt], record.caption)
        return {"pixel_values": pixels, "input_ids": ids, "labels": labels}

    def encode(self, prompt: list[int], caption: str) -> tuple[list[int], list[int]]:
        """Prompt ids + target ids; labels only on the target (ids equal to pad, i.e. eos, masked as the original)."""
        target = self.tokenizer(
            caption + self.end_sym, add_special_tokens=False, truncation=True, max_length=self.max_txt_len
        ).input_ids
        pad = self.tokenizer.pad_token_id
        return prompt + target, [-100] * len(prompt) + [-100 if t == pad else t for t in target]


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: attention 0 and label -100 on padding."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        mask[row, :n] = 1
    pixels = torch.stack([s["pixel_values"] for s in samples])
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "labels": labels}


class Collate:
    """`collate` with the pad id bound (a class, so data-loading workers can pickle it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.pad_id)


# ---------------------------------------------------------------------------------------------------------------
# Order


class TrainOrder:
    """Endless batches of keys from micro-batch `start` on, this process's share of each global batch.

    Pass p over the data is the permutation `default_rng([seed, p])`; global micro-batch m takes positions
    [m*B*W, (m+1)*B*W) of the endless sequence of passes, and process r the r-th B of them. One prompt is drawn
    per micro-batch (shared by its samples, as the original draws one per batch).
    """

    def __init__(self, size, batch_size, num_prompts, seed, start=0, rank=0, world=1):
        self.size, self.batch_size, self.num_prompts, self.seed = size, batch_size, num_prompts, seed
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        permutations: dict[int, np.ndarray] = {}
        m = self.start
        while True:
            prompt = int(np.random.default_rng([self.seed, m, 1]).integers(self.num_prompts))
            first = (m * self.world + self.rank) * self.batch_size
            keys = []
            for position in range(first, first + self.batch_size):
                epoch, offset = divmod(position, self.size)
                if epoch not in permutations:
                    permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.size)}
                keys.append((epoch, int(permutations[epoch][offset]), prompt))
            yield keys
            m += 1


def val_batches(size: int, batch_size: int, num_prompts: int, rank: int = 0, world: int = 1) -> list[list[tuple]]:
    """Every validation record once, split over processes; prompt i % number of prompts (fixed, not drawn)."""
    mine = list(range(rank, size, world))
    keys = [(0, i, i % num_prompts) for i in mine]
    return [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
