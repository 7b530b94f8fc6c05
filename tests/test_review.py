"""The clinician review: statistics against hand-computed numbers, the ratings store, the page's server-side checks
(TestClient) and one rating through a real browser, reflected by the summary."""

from __future__ import annotations

import io
import json
import re
import socket
import sqlite3
import stat
from pathlib import Path

import pytest
from conftest import image_bytes
from fastapi.testclient import TestClient
from PIL import ExifTags, Image

from skingpt4.errors import InputError
from skingpt4.inputs.images import load_image
from skingpt4.review.page import create_app, exposure_warning, load_cases, serve_review
from skingpt4.review.stats import fleiss_kappa, format_summary, summarise, summary, wilson
from skingpt4.review.store import ANSWERS, COLUMNS, STATEMENT_KEYS, STATEMENTS, Rating, ReviewStore, clean_rater

CHROMIUM = "/usr/bin/chromium"
SCRIPT = "<script>alert('x')</script> Likely eczema & not <b>melanoma</b>."
PROMPT = "Could you describe the skin disease in this image for me?"


def answers(default: str, **overrides: str) -> dict[str, str]:
    return {key: overrides.get(key, default) for key in STATEMENT_KEYS}


def gps_jpeg() -> bytes:
    img = Image.new("RGB", (64, 48), (180, 90, 60))
    exif = img.getexif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLatitude] = "N", (52.0, 31.0, 12.0)
    exif[ExifTags.Base.Make] = "PhoneCo"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(buf.getvalue())).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the probe is real
    return buf.getvalue()


def write_cases(folder: Path, rows: list[dict]) -> Path:
    path = folder / "transcripts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def case_row(case: str, image: str, text: str = "Eczema.", sha: str | None = None, label: str | None = None):
    turns = [{"role": "user", "text": PROMPT}, {"role": "assistant", "text": text}]
    return {"case": case, "image": image, "image_sha256": sha, "label": label, "turns": turns}


@pytest.fixture
def review_files(tmp_path) -> dict[str, Path]:
    """Two cases: c1 with a GPS-tagged photo (relative path) and a hostile transcript; c2 whose image is missing."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "c1.jpg").write_bytes(gps_jpeg())
    rows = [case_row("c1", "img/c1.jpg", SCRIPT, label="eczema"), case_row("c2", str(tmp_path / "gone.jpg"))]
    references = tmp_path / "mine.csv"
    references.write_text("case,answer\nc1,Atopic dermatitis <flexural>\n", encoding="utf-8")
    return {
        "transcripts": write_cases(tmp_path, rows),
        "references": references,
        "store": tmp_path / "db" / "r.sqlite",
    }


# -- statistics against hand-computed numbers --------------------------------------------------------------------


def test_wilson_hand_computed():
    low, high = wilson(81, 100)  # centre (0.81 + z^2/200) / (1 + z^2/100) = 0.79853, half-width 0.07632
    assert (low, high) == pytest.approx((0.72221, 0.87485), abs=1e-5)
    assert wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)  # upper = z^2 / (n + z^2)
    assert wilson(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson(3, 5) == pytest.approx((0.230724, 0.882379), abs=1e-6)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(6, 5)


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) / Wikipedia: 10 subjects, 14 raters, 5 categories; P-bar 0.378, P-bar_e 0.213, kappa 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    kappa = fleiss_kappa(table)
    assert round(kappa, 3) == 0.210 and kappa == pytest.approx(0.2099307, abs=1e-7)
    assert fleiss_kappa([[2, 0], [0, 2]]) == 1.0  # perfect agreement, chance 0.5
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # one category only: 0/0, not a number
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 0], [1, 0]])  # unequal rater counts
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 0]])  # one rater cannot agree with anyone


HAND_BUILT = [  # (rater, case, answers): ann and bob rate c1 and c2, cyd only c3
    ("ann", "c1", answers("strongly_agree", willingness="disagree", privacy="agree")),
    ("bob", "c1", answers("agree", willingness="disagree", privacy="agree")),
    ("ann", "c2", answers("neutral", willingness="strongly_disagree", privacy="agree")),
    ("bob", "c2", answers("neutral", willingness="disagree", privacy="agree")),
    ("cyd", "c3", answers("strongly_agree", privacy="strongly_disagree")),
]


def test_summary_of_hand_built_ratings(tmp_path):
    with ReviewStore(tmp_path / "r.sqlite") as store:
        for rater, case, given in HAND_BUILT:
            comment = '=HYPERLINK("http://x")' if rater == "bob" else "fine"
            store.save(Rating(rater, case, given, comment, image_sha256="ab" * 32))
    result = summary(tmp_path / "r.sqlite", tmp_path / "out")
    assert (result["ratings"], result["raters"], result["cases"]) == (5, 3, 3)
    # Kappa uses the cases with the modal number (2) of raters: c1 and c2; c3 (one rater) is left out.
    assert (result["kappa_raters_per_case"], result["kappa_cases"], result["kappa_cases_total"]) == (2, 2, 3)
    by_key = {s["key"]: s for s in result["statements"]}
    diagnosis = by_key["diagnosis"]  # SA: ann c1, cyd c3; A: bob c1; N: ann c2, bob c2
    assert list(diagnosis["counts"]) == list(ANSWERS) and list(diagnosis["counts"].values()) == [2, 1, 2, 0, 0]
    assert (diagnosis["agree"], diagnosis["n"], diagnosis["share"]) == (3, 5, 0.6)
    assert (diagnosis["wilson_low"], diagnosis["wilson_high"]) == pytest.approx((0.230724, 0.882379), abs=1e-6)
    # c1 = [1,1,0,0,0], c2 = [0,0,2,0,0]: P-bar = (0 + 1)/2, P_e = (1/4)^2 + (1/4)^2 + (2/4)^2 = 0.375 -> 0.2
    assert diagnosis["kappa"] == pytest.approx(0.2, abs=1e-12)
    willingness = by_key["willingness"]  # D: ann c1, bob c1, bob c2; SD: ann c2; SA: cyd c3
    assert list(willingness["counts"].values()) == [1, 0, 0, 3, 1]
    assert (willingness["agree"], willingness["share"]) == (1, 0.2)
    # c1 = [0,0,0,2,0], c2 = [0,0,0,1,1]: P-bar = 0.5, P_e = (3/4)^2 + (1/4)^2 = 0.625 -> -1/3
    assert willingness["kappa"] == pytest.approx(-1 / 3, abs=1e-12)
    privacy = by_key["privacy"]  # all four kappa ratings "agree": chance agreement 1, kappa undefined
    assert (privacy["agree"], privacy["share"], privacy["kappa"]) == (4, 0.8, None)
    assert [s["paper_share"] for s in result["statements"]] == [0.8063, 0.825, 0.8563, 0.875, 0.837, 0.925, 0.775]

    text = format_summary(result)
    assert "5 rating(s) by 3 rater(s) on 3 case(s)" in text
    assert re.search(
        r"Diagnosis correct or relevant\s+3/5\s+60\.0%\s+\[ 23\.1%,  88\.2%\]\s+2\s+1\s+2\s+0\s+0\s+0\.200", text
    )
    assert re.search(r"Local deployment protects privacy\s+4/5\s+80\.0%.*\s-\s+92\.50%", text)
    assert "Fleiss' kappa: 2 of 3 cases, those rated by 2 raters" in text

    out = tmp_path / "out"
    rows = (out / "ratings.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "rater,case,image_sha256," + ",".join(STATEMENT_KEYS) + ",comment,updated"
    assert len(rows) == 6 and rows[1].startswith("ann,c1," + "ab" * 32 + ",strongly agree,strongly agree,")
    assert "'=HYPERLINK" in (out / "ratings.csv").read_text()  # a spreadsheet shows it, does not run it
    assert json.loads((out / "summary.json").read_text())["statements"][0]["agree"] == 3
    png = (out / "agreement.png").read_bytes()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (800, 460)
    assert all(stat.S_IMODE((out / name).stat().st_mode) == 0o600 for name in ("ratings.csv", "agreement.png"))


def test_summary_without_kappa_and_bad_stores(tmp_path):
    result = summarise([Rating("ann", "c1", answers("agree")), Rating("ann", "c2", answers("agree"))])
    assert result["kappa_cases"] == 0 and result["kappa_raters_per_case"] is None
    assert "not computed (no case was rated by two or more raters)" in format_summary(result)
    with pytest.raises(InputError, match="no review store at") as err:
        summary(tmp_path / "typo.sqlite")
    assert not (tmp_path / "typo.sqlite").exists() and "\n" not in str(err.value)
    ReviewStore(tmp_path / "empty.sqlite").close()
    with pytest.raises(InputError, match="holds no ratings yet"):
        summary(tmp_path / "empty.sqlite")


# -- the store ---------------------------------------------------------------------------------------------------


def test_store_upsert_private_wal_and_reopen(tmp_path):
    path = tmp_path / "new" / "reviews.sqlite"
    with ReviewStore(path) as store:
        first = store.save(Rating(" Dr. Ann ", "c1", answers("agree"), "first look", "aa"))
        assert first.rater == "dr. ann" and first.updated  # as it counts: spaces and case folded
        store.save(Rating("Dr. Ann", "c1", answers("disagree", privacy="neutral"), "changed my mind", "aa"))
        store.save(Rating("Bob", "c1", answers("neutral")))
        assert store.rated_cases("DR.  ANN") == {"c1"} and store.rated_cases("nobody") == set()
        with store._locked() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    assert raw.execute("SELECT count(*) FROM ratings").fetchone()[0] == 2  # re-rating replaced, not added
    raw.close()
    with ReviewStore(path) as store:
        assert store.integrity() == "ok"
        again = store.get("Dr. Ann", "c1")
        assert again.answers == answers("disagree", privacy="neutral") and again.comment == "changed my mind"
        assert [(r.rater, r.case) for r in store.ratings()] == [("bob", "c1"), ("dr. ann", "c1")]


def test_store_refuses_bad_ratings_and_foreign_files(tmp_path):
    with ReviewStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(InputError, match="missing: willingness"):
            store.save(Rating("ann", "c1", {k: "agree" for k in STATEMENT_KEYS[:-1]}))
        with pytest.raises(InputError, match="answers must be one of"):
            store.save(Rating("ann", "c1", answers("maybe")))
        assert store.ratings() == []
    for bad in ["", "   ", "x" * 65, "ann\x00", "an\u200bn", "tab\there"]:
        with pytest.raises(InputError, match="1-64 characters"):
            clean_rater(bad)
    assert clean_rater("  Dr.  Müller-Lüdenscheidt ") == "dr. müller-lüdenscheidt" and clean_rater("x" * 64)
    assert clean_rater("BOB ") == clean_rater("bob") == "bob"
    (tmp_path / "text.sqlite").write_text("not a database at all")
    foreign = sqlite3.connect(tmp_path / "foreign.sqlite")
    foreign.execute("CREATE TABLE t (x)")
    foreign.close()
    newer = sqlite3.connect(tmp_path / "newer.sqlite")
    newer.execute(f"PRAGMA application_id = {0x536B4752}")
    newer.execute("PRAGMA user_version = 9")
    newer.execute("CREATE TABLE t (x)")
    newer.close()
    for name, message in [("text", "not a skingpt4 review store"), ("foreign", "not a skingpt4 review store")]:
        with pytest.raises(InputError, match=message):
            ReviewStore(tmp_path / f"{name}.sqlite")
    with pytest.raises(InputError, match=r"newer version \(9\)"):
        ReviewStore(tmp_path / "newer.sqlite")


# -- input files -------------------------------------------------------------------------------------------------


def test_loading_cases_and_bad_transcripts(review_files, tmp_path):
    cases = load_cases(review_files["transcripts"], review_files["references"])
    assert [c.id for c in cases] == ["c1", "c2"]
    assert cases[0].image == tmp_path / "img" / "c1.jpg"  # relative to the transcripts file
    assert cases[0].reference == "Atopic dermatitis <flexural>" and cases[1].reference is None
    assert cases[0].turns == (("user", PROMPT), ("assistant", SCRIPT))
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps({"case": "c2", "answer": "Psoriasis"}) + "\n")
    assert load_cases(review_files["transcripts"], jsonl)[1].reference == "Psoriasis"

    good = json.dumps(case_row("a", "a.png"))
    bad = {
        "missing.jsonl": None,
        "empty.jsonl": "\n\n",
        "broken.jsonl": good + "\n{not json\n",
        "list.jsonl": "[1, 2]\n",
        "nocase.jsonl": json.dumps({**case_row("a", "a.png"), "case": ""}) + "\n",
        "noturns.jsonl": json.dumps({**case_row("a", "a.png"), "turns": [{"role": "doctor", "text": "x"}]}) + "\n",
        "twice.jsonl": good + "\n" + good + "\n",
        "binary.jsonl": b"\xff\xfe\x00junk",
    }
    expected = {
        "missing.jsonl": "no transcripts file at",
        "empty.jsonl": "holds no cases",
        "broken.jsonl": "line 2: not valid JSON",
        "list.jsonl": "line 1: expected a JSON object",
        "nocase.jsonl": "'case' must be a non-empty string",
        "noturns.jsonl": "'turns' must be a list",
        "twice.jsonl": "case 'a' appears more than once",
        "binary.jsonl": "is not UTF-8 text",
    }
    for name, content in bad.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(InputError, match=re.escape(expected[name])) as err:
            load_cases(path)
        assert "\n" not in str(err.value)
    unrelated = tmp_path / "other.csv"
    unrelated.write_text("case,answer\nzzz,nothing\n")
    with pytest.raises(InputError, match="no reference answer names a case"):
        load_cases(review_files["transcripts"], unrelated)
    (tmp_path / "nocol.csv").write_text("id,text\nc1,x\n")
    with pytest.raises(InputError, match="row 1: needs 'case' and 'answer'"):
        load_cases(review_files["transcripts"], tmp_path / "nocol.csv")


# -- the page, server side ---------------------------------------------------------------------------------------


@pytest.fixture
def client(review_files):
    store = ReviewStore(review_files["store"])
    app = create_app(load_cases(review_files["transcripts"], review_files["references"]), store)
    with TestClient(app) as c:
        c.store, c.token = store, app.state.review.token
        yield c
    store.close()


def sign_in(client, name="Dr. Ann") -> None:
    response = client.post("/rater", data={"name": name, "token": client.token})
    assert response.status_code == 200 and response.url.path == "/case/1"


def test_rater_is_asked_for_and_sanitised(client):
    first = client.get("/")
    assert "Who is rating?" in first.text and "id='rater-name'" in first.text
    assert client.get("/case/1").url.path == "/"  # no rater yet: back to the name form
    refused = client.post("/rater", data={"name": "x" * 65, "token": client.token})
    assert refused.status_code == 400 and "a rater name is 1-64 characters" in refused.text
    assert client.post("/rater", data={"name": "ann"}).status_code == 403  # no token: not our form
    for origin in ["http://evil.test", "null"]:  # another site; a sandboxed frame or data: page
        cross = client.post("/rater", data={"name": "ann", "token": client.token}, headers={"Origin": origin})
        assert cross.status_code == 403 and "cross-site" in cross.text
    sign_in(client, "  <b>Ann</b>  ")
    page = client.get("/case/1").text
    assert "<b id='rater'>&lt;b&gt;ann&lt;/b&gt;</b>" in page and "0 of 2 done" in page
    client.cookies.clear()
    client.cookies.set("skingpt4_rater", "%00bad")
    assert "Who is rating?" in client.get("/", follow_redirects=True).text  # a tampered cookie is no rater


def test_missing_statement_is_refused_and_keeps_what_was_entered(client):
    sign_in(client)
    partial = {**answers("agree"), "comment": "border <unclear>", "token": client.token}
    del partial["willingness"], partial["useful"]
    response = client.post("/case/1", data=partial)
    assert response.status_code == 400
    messages = re.findall(r"id='message' role='alert'>([^<]*)<", response.text)
    assert messages == ["Please answer all seven statements; missing: 3, 7."]
    assert "id='diagnosis-agree' aria-label='agree: The diagnosis by SkinGPT-4 is correct or relevant.' checked" in (
        response.text
    )
    assert response.text.count(" checked>") == 5 and ">border &lt;unclear&gt;</textarea>" in response.text
    assert response.text.count("<tr class='missing'>") == 2
    wrong = client.post("/case/1", data={**answers("agree"), "diagnosis": "perhaps", "token": client.token})
    assert wrong.status_code == 400 and "Statement 1 needs exactly one of the five answers" in wrong.text
    assert client.store.ratings() == []


def test_page_escapes_text_and_loads_nothing_from_outside(client):
    sign_in(client)
    response = client.get("/case/1")
    text = response.text
    assert (
        "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Likely eczema &amp; not &lt;b&gt;melanoma&lt;/b&gt;."
        in text
    )
    assert "<script" not in text and "<b>melanoma" not in text
    assert "Atopic dermatitis &lt;flexural&gt;" in text and "<p id='label'>eczema</p>" in text
    assert "http://" not in text and "https://" not in text  # no CDN, font or analytics
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "script-src" not in response.headers["content-security-policy"]  # so no script runs at all
    assert response.headers["cache-control"] == "no-store" and response.headers["x-content-type-options"] == "nosniff"


def test_image_is_a_fresh_png_without_metadata(client, review_files):
    sign_in(client)
    response = client.get("/image/1")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = response.content
    assert served.startswith(b"\x89PNG") and b"Exif" not in served and b"eXIf" not in served
    shown = Image.open(io.BytesIO(served))
    assert shown.format == "PNG" and not shown.getexif() and not shown.info
    original = load_image(review_files["transcripts"].parent / "img" / "c1.jpg")
    assert shown.convert("RGB").tobytes() == original.tobytes()  # same pixels, nothing else
    missing = client.get("/image/2")
    gone = review_files["transcripts"].parent / "gone.jpg"
    assert missing.status_code == 404 and missing.text == f"image unavailable: no such file: {gone}"
    assert client.get("/image/3").status_code == 404


def test_unreadable_image_can_still_be_rated_and_navigation(client, review_files):
    sign_in(client)
    page = client.get("/case/2").text
    gone = review_files["transcripts"].parent / "gone.jpg"
    assert f"<p class='warn' id='image-unavailable'>image unavailable: no such file: {gone}</p>" in page
    saved = client.post("/case/2", data={**answers("neutral"), "token": client.token})
    assert saved.url.path == "/case/1" and "1 of 2 done" in saved.text  # next unrated, wrapping round
    done = client.post("/case/1", data={**answers("agree"), "comment": "ok", "token": client.token})
    assert "All 2 cases rated" in done.text and "2 of 2 done" in done.text
    again = client.get("/case/1").text
    assert "You rated this case" in again and again.count(" checked>") == 7 and ">ok</textarea>" in again
    client.post("/case/1", data={**answers("strongly_disagree"), "token": client.token})  # re-rating replaces
    ratings = {(r.rater, r.case): r for r in client.store.ratings()}
    assert len(ratings) == 2 and ratings[("dr. ann", "c1")].answers == answers("strongly_disagree")
    assert ratings[("dr. ann", "c1")].comment == ""
    assert client.get("/case/9").status_code == 404


def test_changed_image_and_foreign_host_are_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes())
    transcripts = write_cases(tmp_path, [case_row("a", "a.png", sha="0" * 64)])
    with ReviewStore(tmp_path / "r.sqlite") as store:
        cases = load_cases(transcripts)
        with TestClient(create_app(cases, store)) as c:
            c.post("/rater", data={"name": "ann", "token": c.app.state.review.token})
            assert "image_sha256 does not match" in c.get("/case/1").text
        with TestClient(create_app(cases, store, allowed_hosts={"127.0.0.1:7870"})) as c:
            assert c.get("/").status_code == 421  # DNS rebinding: a page served under another name


def test_exposure_warning_and_taken_port(review_files):
    assert exposure_warning("127.0.0.1") is None and exposure_warning("::1") is None
    assert exposure_warning("localhost") is None
    assert "beyond this machine" in exposure_warning("0.0.0.0") and exposure_warning("192.168.1.5")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_review(review_files["transcripts"], review_files["store"], port=port, block=False)


# -- a real browser ----------------------------------------------------------------------------------------------


def test_browser_rating_is_reflected_by_summary(review_files):
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run `apt-get install -y chromium`"
    from playwright.sync_api import expect, sync_playwright

    chosen = ["strongly_agree", "agree", "strongly_agree", "agree", "neutral", "disagree", "strongly_disagree"]
    running = serve_review(
        review_files["transcripts"], review_files["store"], port=0, references=review_files["references"], block=False
    )
    outside: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                page = browser.new_page()
                page.on("request", lambda r: None if r.url.startswith(running.url) else outside.append(r.url))
                page.goto(running.url)
                page.locator("#rater-name").fill("Dr. Müller")
                page.locator("#start").click()
                expect(page.locator("#case-id")).to_have_text("c1")
                expect(page.locator("#progress")).to_have_text("0 of 2 done")
                image = page.locator("#case-image")
                expect(image).to_be_visible()
                assert image.evaluate("img => img.complete && img.naturalWidth") == 64
                expect(page.locator("#transcript")).to_contain_text(SCRIPT)  # shown as text, not run
                expect(page.locator("#reference")).to_contain_text("Atopic dermatitis <flexural>")
                for statement, answer in zip(STATEMENTS, chosen):
                    page.locator(f"#{statement.key}-{answer}").check()
                page.locator("#comment").fill("Plausible; would biopsy.")
                page.locator("#save").click()
                expect(page.locator("#case-id")).to_have_text("c2")  # on to the next unrated case
                expect(page.locator("#progress")).to_have_text("1 of 2 done")
                expect(page.locator("#image-unavailable")).to_contain_text("image unavailable: no such file")
                forger = browser.new_context()  # another browser that hand-sets the cookie to rate as Dr. Müller
                forger.add_cookies([{"name": "skingpt4_rater", "value": "dr.%20m%C3%BCller", "url": running.url}])
                forged = forger.new_page()
                forged.goto(running.url)
                expect(forged.locator("h1")).to_have_text("Who is rating?")  # refused: the name form again
                forger.add_cookies([{"name": "skingpt4_rater", "value": "dr.%20m%C3%BCller.00ff", "url": running.url}])
                forged.goto(f"{running.url}case/1")
                expect(forged.locator("h1")).to_have_text("Who is rating?")
            finally:
                browser.close()
    finally:
        running.close()
    assert outside == []
    result = summary(review_files["store"])
    assert (result["ratings"], result["raters"], result["cases"]) == (1, 1, 1)
    shares = [s["share"] for s in result["statements"]]
    assert shares == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [next(a for a in ANSWERS if s["counts"][a]) for s in result["statements"]] == chosen
    with ReviewStore(review_files["store"], create=False) as store:
        (rating,) = store.ratings()
    assert (rating.rater, rating.case, rating.comment) == ("dr. müller", "c1", "Plausible; would biopsy.")


def test_an_untrained_models_transcripts_carry_the_notice(tmp_path):
    (tmp_path / "c1.jpg").write_bytes(gps_jpeg())
    rows = [{**case_row("c1", "c1.jpg"), "untrained": True}]
    store = ReviewStore(tmp_path / "r.sqlite")
    app = create_app(load_cases(write_cases(tmp_path, rows)), store)
    with TestClient(app) as c:
        c.token = app.state.review.token
        sign_in(c)
        assert "id='untrained'" in c.get("/case/1").text and "UNTRAINED random model" in c.get("/case/1").text
    store.close()


def test_a_forged_cookie_names_no_one(client):
    sign_in(client, "Bob")
    good = client.cookies.get("skingpt4_rater")
    assert good.startswith("bob.") and "bob" in client.get("/case/1").text
    for forged in ["bob", "ann." + good.split(".", 1)[1], good[:-1] + ("0" if good[-1] != "0" else "1")]:
        client.cookies.clear()
        client.cookies.set("skingpt4_rater", forged)
        assert "Who is rating?" in client.get("/", follow_redirects=True).text


def test_bob_and_BOB_are_one_rater(tmp_path):
    """Names count folded: a store written before that (raw rows "bob" and "BOB ") still counts one rater."""
    path = tmp_path / "r.sqlite"
    with ReviewStore(path) as store:
        store.save(Rating("bob", "c1", answers("agree")))
        store.save(Rating("BOB ", "c1", answers("disagree")))  # the same rater, re-rating
        store.save(Rating("ann", "c1", answers("agree")))
        assert len(store.ratings()) == 2
        with store._locked() as conn:  # as an older version wrote them, without folding
            conn.execute("UPDATE ratings SET rater = 'Ann ' WHERE rater = 'ann'")
            columns = ", ".join(["'ANN'", *COLUMNS[1:-1], "'9999'"])  # a later rating, as 'ANN'
            conn.execute(f"INSERT INTO ratings SELECT {columns} FROM ratings WHERE rater = 'bob'")
    result = summary(path)
    assert (result["raters"], result["ratings"]) == (2, 2)  # ann's later rating (disagree, from ANN) stands
    assert [s["agree"] for s in result["statements"]] == [0] * 7


def test_per_rater_links(tmp_path, review_files):
    store = ReviewStore(tmp_path / "r.sqlite")
    app = create_app(load_cases(review_files["transcripts"]), store, raters=["Ann", "Bob"])
    links = app.state.review.links
    assert sorted(links.values()) == ["ann", "bob"] and all(len(link) >= 20 for link in links)
    with TestClient(app) as c:
        assert c.get("/").status_code == 403 and "Open the rater link" in c.get("/").text
        token = app.state.review.token
        assert c.post("/rater", data={"name": "Ann", "token": token}).status_code == 403  # names cannot be typed
        assert c.get("/as/not-a-link").status_code == 404
        bob = next(link for link, name in links.items() if name == "bob")
        assert "<b id='rater'>bob</b>" in c.get(f"/as/{bob}").text
    store.close()
