"""docs/reliability.md T-1: every malformed-input case through load_image and through the sandboxed Decoder.

Each case must be accepted (RGB, no metadata once saved as PNG, within the limits, the case's own check) or refused
with a one-line ImageRejected, as the case expects; never any other exception, and never a hang. The hang guard is
60 s per decode, far above any normal decode even on a loaded machine: it catches a hang, not slowness, and no
assertion here depends on speed (the seconds measured are only printed in the summary).
"""

from __future__ import annotations

import io
import time
from collections import Counter

import pytest
from conftest import within
from malformed import CATEGORIES, Case, all_cases, data_url_cases, decode_data_url, has_metadata, image_cases
from PIL import Image

from skingpt4.inputs.images import DEFAULT_LIMITS, ImageRejected, load_image
from skingpt4.serve.sandbox import Decoder

HANG_GUARD_S = 60.0
TOO_SLOW = "image took too long to decode"  # the Decoder's own timeout message: no case may end in it
RESULTS: dict[tuple[str, str], tuple[str, float]] = {}  # (path, case name) -> (outcome, seconds)


@pytest.fixture(scope="module")
def decoder():
    # The child's timeout is generous too, so a slow decode on a busy machine is not mistaken for a refusal; a child
    # that hangs still ends in TOO_SLOW, which `run` counts as a failure for every case.
    with Decoder(timeout=HANG_GUARD_S / 2) as dec:
        dec.load(_case("8x8").data)  # start the child here, so that its start-up is not counted as decode time
        yield dec


def run(decode, case: Case) -> tuple[str, float]:
    """Decode once (under the hang guard); assert the outcome is well-formed and as expected. Returns (outcome,
    seconds); the seconds are for the summary's report only."""
    start = time.perf_counter()
    try:
        img = within(HANG_GUARD_S, decode, case.data)
    except ImageRejected as exc:
        seconds = time.perf_counter() - start
        message = str(exc)
        assert "\n" not in message and 0 < len(message) <= 200, repr(message)
        assert message != TOO_SLOW, f"{case.name}: the decoder child hung (no answer in {HANG_GUARD_S / 2:.0f} s)"
        assert case.expect == "reject", f"{case.name}: expected accept, got ImageRejected({message!r})"
        return "reject", seconds
    seconds = time.perf_counter() - start
    assert case.expect == "accept", f"{case.name}: expected a rejection, got a {img.mode} {img.size} image"
    assert_normalised(img)
    if case.check is not None:
        case.check(img)
    return "accept", seconds


def assert_normalised(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.info == {} and len(img.getexif()) == 0
    width, height = img.size
    limits = DEFAULT_LIMITS
    assert limits.min_side <= min(width, height) and max(width, height) <= limits.max_side
    assert width * height <= limits.max_pixels
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert not has_metadata(buf.getvalue())


CASE_IDS = [c.name for c in image_cases()]


@pytest.mark.parametrize("name", CASE_IDS)
def test_load_image(name):
    case = _case(name)
    RESULTS["load_image", name] = ("not as expected", float("nan"))  # replaced below unless an assertion fails
    RESULTS["load_image", name] = run(load_image, case)


@pytest.mark.parametrize("name", CASE_IDS)
def test_sandbox_decoder(name, decoder):
    case = _case(name)
    RESULTS["Decoder", name] = ("not as expected", float("nan"))
    RESULTS["Decoder", name] = run(decoder.load, case)


@pytest.mark.parametrize("name", [c.name for c in data_url_cases()])
def test_data_url_expectations_are_consistent(name):
    """The base64 cases are for the HTTP API; here they go through the reference rule in malformed.decode_data_url."""
    case = _case(name)
    run(lambda _: load_image(decode_data_url(case.data_url)), case)


def test_corpus_shape():
    all_cases.cache_clear()
    cases = within(HANG_GUARD_S, all_cases)  # building it must not hang (its speed is not asserted)
    assert len(cases) >= 45
    assert {c.category for c in cases} == set(CATEGORIES)
    for case in cases:
        assert (case.data is None) != (case.data_url is None), case.name
        assert case.expect in ("accept", "reject"), case.name
        assert case.check is None or case.expect == "accept", case.name


def test_metadata_cases_really_carry_metadata():
    """Otherwise the 'no metadata after decoding' assertion would prove nothing."""
    carriers = [c for c in image_cases() if c.category == "metadata" and c.data.startswith((b"\xff\xd8", b"\x89PNG"))]
    assert len(carriers) >= 10
    assert all(has_metadata(c.data) for c in carriers)


def test_summary(decoder, capsys):
    """Counts per outcome and the slowest decode for each path (cases not yet run in this session are run here)."""
    for path, decode in (("load_image", load_image), ("Decoder", decoder.load)):
        for case in image_cases():
            if (path, case.name) not in RESULTS:
                start = time.perf_counter()
                try:
                    RESULTS[path, case.name] = run(decode, case)
                except AssertionError:  # reported by the case's own test; counted here, not failed twice
                    RESULTS[path, case.name] = ("not as expected", time.perf_counter() - start)
    lines = [
        f"T-1 malformed corpus: {len(all_cases())} cases ({len(image_cases())} byte, {len(data_url_cases())} data-URL)"
    ]
    for path in ("load_image", "Decoder"):
        rows = {name: v for (p, name), v in RESULTS.items() if p == path}
        counts = Counter(outcome for outcome, _ in rows.values())
        timed = {name: seconds for name, (_, seconds) in rows.items() if seconds == seconds}  # NaN: not timed
        slowest = max(timed, key=timed.__getitem__)
        lines.append(
            f"  {path:10s}: accept {counts['accept']}, reject {counts['reject']}, "
            f"not as expected {counts['not as expected']}; max decode {timed[slowest] * 1000:.1f} ms ({slowest})"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # every case ran under the hang guard in `run` (a hang fails there); here: no case is missing from either path
    for path in ("load_image", "Decoder"):
        assert {name for p, name in RESULTS if p == path} == {c.name for c in image_cases()}, path


def _case(name: str) -> Case:
    return next(c for c in all_cases() if c.name == name)
