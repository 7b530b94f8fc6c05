"""The evaluation report: one document rendered twice (HTML and Markdown) plus PNG plots.

The content is built once as a list of blocks (headings, paragraphs, tables, images) and both renderers walk the
same list, so the two files cannot drift apart. The HTML embeds its PNGs as data URIs, so the one file can be
shared on its own. The Markdown links the PNG files next to it.

Plots use matplotlib's object API on an Agg canvas. That needs no pyplot, leaves no global state and works
without a display. Fixed sizes, dpi and style, and no PNG timestamp or software tag, give identical bytes for
identical metrics.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skingpt4.engine.settings import setting_rows
from skingpt4.evaluate import metrics as M

DPI = 100
SKIN_TONE_SIZE = (7.0, 4.5)  # inches
CALIBRATION_SIZE = (6.0, 6.0)
_STYLE = {"font.size": 10, "axes.titlesize": 11, "text.parse_math": False}  # a "$" in a label is text, not TeX
_NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "auroc_macro": "AUROC macro"}
_PNG_META = {"Software": None}  # no version string, so bytes don't change with matplotlib upgrades alone


def confusion_size(n_labels: int) -> tuple[float, float]:
    """Inches for the heatmap: grows with the label count so cells stay readable, within fixed bounds."""
    side = float(min(max(5.0, 2.5 + 0.45 * (n_labels + 1)), 18.0))
    return side, side


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_ci(m: dict | None) -> str:
    """'0.700 (0.640, 0.760)' from {"value", "ci"}; the value alone when there is no interval."""
    if not m or m.get("value") is None:
        return "n/a"
    return fmt(m["value"]) + (f" ({fmt(m['ci'][0])}, {fmt(m['ci'][1])})" if m.get("ci") else "")


# ---------------------------------------------------------------------------------------------------------------
# The document: blocks are ("h1"|"h2"|"p"|"banner", text), ("table", header, rows) or ("img", file name, alt text);
# a banner is the red notice an untrained model's report opens with, as its web app and review page do


def build_blocks(metrics: dict, title: str, consistency, latency, calib, images: dict[str, str]) -> list[tuple]:
    ci_name = f"{round(100 * metrics['bootstrap']['ci'])}% CI" if metrics.get("bootstrap") else "CI"
    run = metrics.get("run") or {}
    blocks = [("h1", title)]
    if run.get("untrained"):
        blocks.append(("banner", UNTRAINED_NOTICE))
    blocks += [("p", f"Warning: {warning}.") for warning in metrics.get("warnings", ())]
    blocks.append(("p", _summary(metrics)))
    if run:
        blocks += [("h2", "Run"), ("table", ["Setting", "Value"], setting_rows(run))]
    blocks += _overall(metrics, ci_name) + _per_class(metrics) + _confusion_blocks(metrics, images)
    blocks += _skin_blocks(metrics, ci_name, images) + _calibration_blocks(calib, images)
    blocks += _consistency_blocks(consistency, ci_name) + _latency_blocks(latency)
    blocks.append(("p", "A research tool, not a medical device: these numbers describe this data set only."))
    return blocks


UNTRAINED_NOTICE = (
    "UNTRAINED random model: these numbers measure noise, for trying the software only; they are not results."
)


def _summary(m: dict) -> str:
    mode = "ranked probabilities (choice mode)" if m.get("has_probs") else "free-text answers (open mode)"
    b = m.get("bootstrap") or {}
    boot = f"{b.get('method', 'bootstrap')}, {b.get('n_boot')} resamples, seed {b.get('seed')}" if b else "none"
    return f"{m['n']} cases, {len(m['labels'])} labels, scored from {mode}. Intervals: {boot}."


def _overall(m: dict, ci_name: str) -> list[tuple]:
    rows = [
        ["Accuracy", fmt_ci(m["accuracy"])],
        ["Balanced accuracy", fmt_ci(m["balanced_accuracy"])],
        [f"Unmatched answers ({m['unmatched']['count']} cases)", fmt_ci(m["unmatched"]["share"])],
    ]
    rows += [[f"Top-{k} accuracy", fmt_ci(v)] for k, v in m.get("top_k", {}).items()]
    if "auroc" in m:
        rows.append(["AUROC, macro one-vs-rest", fmt_ci(m["auroc"]["macro"])])
    return [("h2", "Overall"), ("table", ["Metric", f"Value ({ci_name})"], rows)]


def _per_class(m: dict) -> list[tuple]:
    auroc = m.get("auroc", {}).get("per_class", {})
    header = ["Label", "Support", "Precision", "Recall", "F1"] + (["AUROC"] if "auroc" in m else [])
    rows = []
    for label, c in m["per_class"].items():
        row = [label, str(c["support"]), fmt_ci(c["precision"]), fmt_ci(c["recall"]), fmt_ci(c["f1"])]
        rows.append(row + ([fmt_ci(auroc.get(label))] if "auroc" in m else []))
    return [("h2", "Per class"), ("table", header, rows)]


def _confusion_blocks(m: dict, images: dict) -> list[tuple]:
    labels, matrix = m["confusion"]["labels"], m["confusion"]["matrix"]
    rows = [[labels[i]] + [str(v) for v in matrix[i]] for i in range(len(labels) - 1)]  # the unmatched row is zero
    return [
        ("h2", "Confusion matrix"),
        ("p", "Rows are the true label, columns the answer; colour is the share of the row."),
        ("img", images["confusion"], "Confusion matrix heatmap"),
        ("table", ["True label", *labels], rows),
    ]


def _skin_blocks(m: dict, ci_name: str, images: dict) -> list[tuple]:
    by = m["by_skin_type"]
    if not _known_skin_types(by):
        note = "No case has a known Fitzpatrick skin type: nothing can be said by skin type (no chart)."
        return [("h2", "By Fitzpatrick skin type"), ("p", note)]
    rows = [
        [name, str(g["n"]), fmt_ci(g["accuracy"]), fmt_ci(g["balanced_accuracy"]), fmt_ci(g.get("auroc_macro"))]
        for name, g in by["groups"].items()
    ]
    gaps = [[_NAMES.get(name, name), fmt_ci(g), g["best"], g["worst"]] for name, g in by["gap"].items()]
    blocks = [
        ("h2", "By Fitzpatrick skin type"),
        ("table", ["Group", "Cases", "Accuracy", "Balanced accuracy", "AUROC macro"], rows),
        ("img", images["skin_tone"], "Accuracy and balanced accuracy by skin type"),
    ]
    if gaps:
        note = "Gap = best minus worst known group; its interval comes from resampling each group on its own."
        blocks += [("p", note), ("table", ["Metric", f"Gap ({ci_name})", "Best", "Worst"], gaps)]
    else:
        blocks.append(("p", "Fewer than two skin-type groups have cases: no gap is reported."))
    return blocks


def _known_skin_types(by_skin_type: dict) -> bool:
    return any(name != M.UNKNOWN and group["n"] for name, group in by_skin_type["groups"].items())


def _calibration_blocks(calib: dict | None, images: dict) -> list[tuple]:
    if calib is None:
        return [("h2", "Calibration"), ("p", "No probabilities (open mode): no calibration diagram.")]
    rows = [
        [f"{fmt(b['lo'], 1)}-{fmt(b['hi'], 1)}", str(b["n"]), fmt(b["confidence"]), fmt(b["accuracy"])]
        for b in calib["bins"]
        if b["n"]
    ]
    return [
        ("h2", "Calibration"),
        (
            "p",
            f"Confidence is the top probability. Expected calibration error: {fmt(calib['ece'])} over "
            f"{calib['n']} cases.",
        ),
        ("img", images["calibration"], "Reliability diagram"),
        ("table", ["Confidence bin", "Cases", "Mean confidence", "Accuracy"], rows),
    ]


def _consistency_blocks(c: dict | None, ci_name: str) -> list[tuple]:
    if c is None:
        return []
    rows = [
        ["Consistency ratio (modal)", fmt_ci(c["ratio"])],
        ["Pairwise agreement", fmt_ci(c["pairwise"])],
        ["Cases with all runs agreeing", fmt(c["all_agree"])],
    ]
    runs = c["runs_per_case"]
    intro = f"{c['n_cases']} cases, {runs if isinstance(runs, int) else '-'.join(map(str, runs))} runs each."
    return [
        ("h2", "Consistency"),
        ("p", intro),
        ("table", ["Measure", f"Value ({ci_name})"], rows),
        ("p", f"Definition: {c['definition']}."),
    ]


def _latency_blocks(lat: dict | None) -> list[tuple]:
    if lat is None:
        return []
    rows = [["Cases", str(lat["n"])]] + [[k, fmt(lat[k], 2)] for k in ("p50", "p95", "mean")]
    return [("h2", "Seconds per image (batch time / images answered)"), ("table", ["Statistic", "Value"], rows)]


# ---------------------------------------------------------------------------------------------------------------
# Renderers


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {_md(rest[0])}")
        elif kind == "p":
            out.append(_md(rest[0]))
        elif kind == "banner":
            out.append(f"> **{_md(rest[0])}**")
        elif kind == "img":
            out.append(f"![{_md(rest[1])}]({rest[0]})")
        else:
            header, rows = rest
            lines = [_md_row(header), _md_row(["---"] * len(header), escape=False), *map(_md_row, rows)]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _md_row(cells: list[str], escape: bool = True) -> str:
    return "| " + " | ".join(_md(c) if escape else c for c in cells) + " |"


def _md(text: str) -> str:
    """Escape Markdown's active characters (and raw HTML) so a label is shown as written."""
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def render_html(blocks: list[tuple], title: str, png: dict[str, bytes]) -> str:
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "banner":
            body.append(f'<p class="banner" id="untrained">{e(rest[0])}</p>')
        elif kind == "img":
            data = base64.b64encode(png[rest[0]]).decode("ascii")
            body.append(f'<img src="data:image/png;base64,{data}" alt="{e(rest[1])}">')
        else:
            header, rows = rest
            head = "".join(f"<th>{e(c)}</th>" for c in header)
            trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
        ".banner{background:#fee;border:2px solid #c00;padding:8px;font-weight:bold}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
        f"<style>{style}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")  # constrained layout keeps the pixel size fixed
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=_PNG_META)
    return buf.getvalue()


def plot_confusion(confusion: dict) -> bytes:
    """Heatmap with counts; colour is the row share so that rare classes stay visible."""
    cols = confusion["labels"]
    counts = np.array(confusion["matrix"])[:-1]  # the "unmatched" truth row is always empty
    rows = cols[:-1]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure(confusion_size(len(rows)))
    ax = fig.add_subplot()
    many = len(cols) > 20  # past that, upright ticks and small type are what keeps a label per cell legible
    tick_size = 10 if not many else 7 if len(cols) <= 60 else 6
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, j in np.ndindex(counts.shape):
        if counts[i, j]:
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=min(tick_size, 9))
    ax.set_xticks(range(len(cols)), cols, rotation=90 if many else 45, ha="right", va="center", rotation_mode="anchor")
    ax.set_yticks(range(len(rows)), rows)
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("Answer")
    ax.set_ylabel("True label")
    ax.set_title("Confusion matrix (colour: share of row)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def plot_skin_tone(by_skin_type: dict) -> bytes:
    """Grouped bars (accuracy, balanced accuracy) per Fitzpatrick group with their bootstrap intervals."""
    groups = by_skin_type["groups"]
    names = list(groups)
    fig = _figure(SKIN_TONE_SIZE)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    for offset, (key, name, colour) in zip(
        (-0.2, 0.2), (("accuracy", "Accuracy", "#4c72b0"), ("balanced_accuracy", "Balanced accuracy", "#dd8452"))
    ):
        values = np.array([groups[g][key]["value"] or 0.0 for g in names])
        err = np.array([_err(groups[g][key]) for g in names]).T.reshape(2, len(names))
        ax.bar(x + offset, values, 0.4, yerr=err, capsize=4, label=name, color=colour)
    ax.set_xticks(x, [f"{g}\n(n={groups[g]['n']})" for g in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Score")
    ax.set_xlabel("Fitzpatrick skin type")
    ax.set_title("By skin type, with bootstrap intervals")
    fig.legend(loc="outside lower center", ncols=2)  # outside: bars near 1.0 would run into it
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _err(m: dict) -> tuple[float, float]:
    """Error-bar lengths below and above the value; zero without an interval."""
    if not m.get("ci") or m.get("value") is None:
        return 0.0, 0.0
    return max(m["value"] - m["ci"][0], 0.0), max(m["ci"][1] - m["value"], 0.0)


def plot_calibration(calib: dict) -> bytes:
    """Reliability diagram (accuracy against mean confidence per bin) above a histogram of cases per bin."""
    bins = calib["bins"]
    fig = _figure(CALIBRATION_SIZE)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    centres = np.array([(b["lo"] + b["hi"]) / 2 for b in bins])
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [b for b in bins if b["n"]]
    top.plot([0, 1], [0, 1], "--", color="grey", label="Perfect calibration")
    top.plot(
        [b["confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        "o-",
        color="#c44e52",
        label="Accuracy at the bin's mean confidence",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("Accuracy")
    top.grid(alpha=0.3)
    fig.suptitle(f"Reliability diagram (ECE {calib['ece']:.3f}, n={calib['n']})")
    fig.legend(loc="outside lower center", ncols=2)  # outside, since a miscalibrated curve can be anywhere
    bottom.bar(centres, [b["n"] for b in bins], width * 0.9, color="#8c8c8c")
    bottom.set_xlabel("Confidence (top probability)")
    bottom.set_ylabel("Cases")
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def write_report(
    metrics: dict,
    out: Path,
    *,
    title: str = "SkinGPT-4 evaluation",
    consistency: dict | None = None,
    latency: dict | None = None,
    calibration_rows: list[dict] | None = None,
) -> dict[str, Path]:
    """Write report.html, report.md and the PNGs into the folder `out`; return {name: path} of what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    calib = M.calibration(calibration_rows) if calibration_rows else None
    # The user's matplotlibrc must not change the output: start from the defaults, inside a context.
    with matplotlib.style.context("default"), matplotlib.rc_context(_STYLE):
        png = {
            "confusion.png": plot_confusion(metrics["confusion"]),
        }
        if _known_skin_types(metrics["by_skin_type"]):
            png["skin_tone.png"] = plot_skin_tone(metrics["by_skin_type"])
        if calib is not None:
            png["calibration.png"] = plot_calibration(calib)
    images = {name.removesuffix(".png"): name for name in png}
    blocks = build_blocks(metrics, title, consistency, latency, calib, images)
    paths = {}
    for name, data in png.items():
        paths[name.removesuffix(".png")] = _write(out / name, data)
    paths["html"] = _write(out / "report.html", render_html(blocks, title, png).encode("utf-8"))
    paths["markdown"] = _write(out / "report.md", render_markdown(blocks).encode("utf-8"))
    return paths


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
