"""The report: HTML and Markdown carry the same numbers, PNGs are real and not blank, text is escaped."""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skingpt4.evaluate import report
from skingpt4.evaluate.metrics import consistency, evaluate_predictions, latency

LABELS = ["melanoma", "nevus", "basal cell carcinoma", "<b>x</b>", "a|b_c $5"]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def synthetic_rows(n: int = 120, seed: int = 0, probs: bool = True) -> list[dict]:
    """A labelled set whose answers are right about 70% of the time, with skin types I-VI and some unknown."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        truth = int(rng.integers(len(LABELS)))
        p = rng.dirichlet(np.ones(len(LABELS)))
        p[truth] += 0.6 * rng.random()
        p /= p.sum()
        answer = LABELS[int(p.argmax())] if i % 17 else None  # a few unmatched answers
        rows.append(
            {
                "label": LABELS[truth],
                "prediction": answer,
                "probs": dict(zip(LABELS, p.tolist())) if probs else None,
                "fitzpatrick": None if i % 9 == 0 else int(rng.integers(1, 7)),
            }
        )
    return rows


def render(out: Path, probs: bool = True) -> tuple[dict, dict, float]:
    """Metrics of a synthetic set, then the report; returns the metrics, the paths and write_report's seconds."""
    rows = synthetic_rows(probs=probs)
    metrics = evaluate_predictions(rows, LABELS, n_boot=200, seed=0)
    metrics["run"] = {"model": "tiny <script>alert(1)</script>", "mode": "choice" if probs else "open", "seed": 0}
    runs = [["nevus"] * 9 + ["melanoma"], ["melanoma"] * 10, ["nevus", None] * 5]
    start = time.perf_counter()
    paths = report.write_report(
        metrics,
        out,
        consistency=consistency(runs, n_boot=200),
        latency=latency([0.8, 1.1, 0.9, 2.5]),
        calibration_rows=rows if probs else None,
    )
    return metrics, paths, time.perf_counter() - start


class _Text(HTMLParser):
    """Visible body text of an HTML page (attributes, such as the data URIs, are left out)."""

    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("head", "style", "title")

    def handle_endtag(self, tag):
        self._skip -= tag in ("head", "style", "title")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_numbers(text: str) -> list[str]:
    parser = _Text()
    parser.feed(text)
    return NUMBER.findall(" ".join(parser.parts))


def markdown_numbers(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.startswith("![")]  # image links name files
    return NUMBER.findall("\n".join(lines))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    metrics, paths, seconds = render(out)
    total = sum(p.stat().st_size for p in paths.values())
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1024:.1f} KiB" for p in paths.values())
    print(f"\nreport: {total / 1024:.1f} KiB in all ({sizes}); rendered in {seconds:.2f} s")
    return metrics, paths


def test_writes_every_file(rendered):
    _, paths = rendered
    assert set(paths) == {"html", "markdown", "confusion", "skin_tone", "calibration"}
    assert {p.name for p in paths.values()} == {
        "report.html",
        "report.md",
        "confusion.png",
        "skin_tone.png",
        "calibration.png",
    }
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def test_html_and_markdown_carry_the_same_numbers(rendered):
    metrics, paths = rendered
    html_text = paths["html"].read_text(encoding="utf-8")
    md_text = paths["markdown"].read_text(encoding="utf-8")
    numbers = html_numbers(html_text)
    assert len(numbers) > 100
    assert numbers == markdown_numbers(md_text)
    for value in (metrics["accuracy"], metrics["balanced_accuracy"], metrics["auroc"]["macro"]):
        assert report.fmt_ci(value) in html_text and report.fmt_ci(value) in md_text
    gap = report.fmt_ci(metrics["by_skin_type"]["gap"]["accuracy"])
    assert gap in html_text and gap in md_text


def test_text_is_escaped(rendered):
    _, paths = rendered
    html_text = paths["html"].read_text(encoding="utf-8")
    assert "<b>x</b>" not in html_text and "&lt;b&gt;x&lt;/b&gt;" in html_text
    assert "<script>" not in html_text
    md_text = paths["markdown"].read_text(encoding="utf-8")
    assert "<b>" not in md_text and r"\<b\>x\</b\>" in md_text
    assert r"a\|b\_c $5" in md_text  # a pipe would split a table cell


def test_html_is_self_contained(rendered):
    _, paths = rendered
    html_text = paths["html"].read_text(encoding="utf-8")
    assert html_text.count('src="data:image/png;base64,') == 3
    assert "confusion.png" not in html_text
    md_text = paths["markdown"].read_text(encoding="utf-8")
    for name in ("confusion.png", "skin_tone.png", "calibration.png"):
        assert f"]({name})" in md_text


@pytest.mark.parametrize(
    "name, size",
    [
        ("confusion", report.confusion_size(len(LABELS))),
        ("skin_tone", report.SKIN_TONE_SIZE),
        ("calibration", report.CALIBRATION_SIZE),
    ],
)
def test_pngs_are_valid_sized_and_not_blank(rendered, name, size):
    _, paths = rendered
    with Image.open(paths[name]) as img:
        assert img.format == "PNG"
        assert img.size == (round(size[0] * report.DPI), round(size[1] * report.DPI))
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.var() > 0
    assert (pixels < 128).mean() > 0.005  # some ink: text, bars, cells
    print(
        f"\n{name}.png: {img.size[0]}x{img.size[1]}, mean grey {pixels.mean():.0f}, dark share "
        f"{(pixels < 128).mean():.3f}"
    )


def test_output_is_deterministic(rendered, tmp_path):
    _, first = rendered
    _, second, _ = render(tmp_path)
    for key, path in first.items():
        assert second[key].read_bytes() == path.read_bytes(), key


def test_open_mode_has_no_calibration_plot(tmp_path):
    metrics, paths, _ = render(tmp_path, probs=False)
    assert "calibration" not in paths and not (tmp_path / "calibration.png").exists()
    note = "No probabilities (open mode): no calibration diagram."
    assert note in paths["html"].read_text(encoding="utf-8")
    assert note in paths["markdown"].read_text(encoding="utf-8")
    assert html_numbers(paths["html"].read_text(encoding="utf-8")) == markdown_numbers(
        paths["markdown"].read_text(encoding="utf-8")
    )
    assert "top_k" not in metrics


def test_sections_present(rendered):
    _, paths = rendered
    md_text = paths["markdown"].read_text(encoding="utf-8")
    for heading in (
        "Run",
        "Overall",
        "Per class",
        "Confusion matrix",
        "By Fitzpatrick skin type",
        "Calibration",
        "Consistency",
        "Seconds per image (batch time / images answered)",
    ):
        assert f"\n## {heading}\n" in md_text
    assert "| p95 | 2.29 |" in md_text  # 0.8, 0.9, 1.1, 2.5: position 2.85 -> 1.1 + 0.85 * 1.4 = 2.29


def test_no_known_skin_type_says_so_instead_of_an_empty_chart(tmp_path):
    rows = [{**row, "fitzpatrick": None} for row in synthetic_rows(n=30)]
    paths = report.write_report(evaluate_predictions(rows, LABELS, n_boot=20, seed=0), tmp_path)
    assert "skin_tone" not in paths and not (tmp_path / "skin_tone.png").exists()
    for name in ("report.md", "report.html"):
        assert "No case has a known Fitzpatrick skin type" in (tmp_path / name).read_text()
