"""The web app, served for real on 127.0.0.1 with the tiny model: privacy defaults, uploads, sessions, a browser.

One app is launched for the module (a second, with auth, only briefly). Answers are 4 tokens long; what is
tested is the plumbing around the model, not its words.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import http.server
import io
import os
import re
import socket
import stat
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import decode_batches, image_bytes
from gradio_client import Client, handle_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image

from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.inputs.conversation import CLINICAL_PROMPTS
from skingpt4.net import is_loopback
from skingpt4.serve.consult import Consultation
from skingpt4.serve.safety import DISCLAIMER, INTENDED_USE
from skingpt4.serve.uploads import Uploads, sweep
from skingpt4.serve.web import ADD_PHOTO, ASK, NOTICE, WebConfig
from skingpt4.serve.web_launch import (
    answers,
    exposure_warning,
    launch,
    launch_options,
    login_check,
    parse_auth,
    read_auth_file,
)

FAST = GenerationSettings(max_new_tokens=4)
GREEDY = (1, 1.0, True)  # beams, temperature, greedy: the sliders' inputs after the question
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def web(loaded):
    running = launch(ChatEngine(loaded), WebConfig(port=free_port(), settings=FAST), block=False)
    yield running
    running.close()
    assert not running.app.cache.exists()


def client(web) -> Client:
    # Its own downloads would go to /tmp; its default 5 s timeout would test speed on a busy machine.
    return Client(web.url, verbose=False, download_files=False, httpx_kwargs={"timeout": 120})


def cached_files(web) -> list[Path]:
    return [p for p in web.app.cache.rglob("*") if p.is_file()]


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def gps_jpeg() -> bytes:
    img = Image.new("RGB", (64, 48), (180, 90, 60))
    exif = img.getexif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLatitude] = "N", (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef], gps[ExifTags.GPS.GPSLongitude] = "E", (13.0, 24.0, 36.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(buf.getvalue())).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the probe is real
    return buf.getvalue()


def has_metadata(data: bytes) -> bool:
    if b"Exif" in data or b"eXIf" in data:
        return True
    try:
        return bool(Image.open(io.BytesIO(data)).getexif())
    except Exception:  # not an image
        return False


def data_uri_images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def summary_of(download: str) -> str:
    """The consultation summary that the download link carries (built in memory: no file on the server)."""
    return base64.b64decode(re.search(r"href='data:text/html;charset=utf-8;base64,([^']+)'", download)[1]).decode()


def assistant_texts(history: list[dict]) -> list[str]:
    return [m["content"][0]["text"] for m in history if m["role"] == "assistant"]


def user_texts(history: list[dict]) -> list[str]:
    return [m["content"][0]["text"] for m in history if m["role"] == "user"]


# -- configuration and credentials (no server) -------------------------------------------------------------------


def test_defaults_are_private():
    options = launch_options(WebConfig())
    assert options["server_name"] == "127.0.0.1" and options["share"] is False and options["auth"] is None
    assert options["max_file_size"] == "10mb" and options["show_error"] is False and options["ssr_mode"] is False
    assert launch_options(WebConfig(max_image_mb=25))["max_file_size"] == "25mb"  # demo --max-image-mb 25
    assert options["mcp_server"] is False and options["allowed_paths"] == [] and options["run_history"] is False
    assert options["enable_monitoring"] is False and options["strict_cors"] is True
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # set before Gradio was imported


def test_auth_parsing(tmp_path):
    assert parse_auth("ann:s3:cr:et") == ("ann", "s3:cr:et")
    for bad in ["ann", "ann:", ":pw", "  :pw"]:
        with pytest.raises(InputError, match="user:password"):
            parse_auth(bad)
    good = tmp_path / "ok.txt"
    good.write_text("# doctors\nann:one\n\n  bob:two:three\n")
    assert read_auth_file(good) == [("ann", "one"), ("bob", "two:three")]
    bad = tmp_path / "bad.txt"
    bad.write_text("ann:one\nbob-has-no-password\n")
    with pytest.raises(InputError, match=r"line 2: expected user:password") as err:
        read_auth_file(bad)
    assert "bob" not in str(err.value) and "\n" not in str(err.value)  # names the line, never shows it
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="no user:password"):
        read_auth_file(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="cannot read"):
        read_auth_file(tmp_path / "missing.txt")


def test_exposure_warning_and_loopback():
    assert all(is_loopback(h) for h in ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "192.168.1.5", "example.org", "::"])
    assert exposure_warning(WebConfig()) is None
    assert "without --auth" in exposure_warning(WebConfig(host="0.0.0.0"))
    assert exposure_warning(WebConfig(host="0.0.0.0", auth=[("ann", "pw")])) is None


def test_login_check_slows_failures():
    check = login_check([("ann", "pw")], delay=0.2)
    assert asyncio.run(check("ann", "pw")) is True
    start = time.perf_counter()
    assert asyncio.run(check("ann", "wrong")) is False and asyncio.run(check("eve", "pw")) is False
    assert time.perf_counter() - start >= 0.4


def test_take_upload_deletes_and_stays_inside(tmp_path):
    root = tmp_path / "cache"
    (root / "abc").mkdir(parents=True)
    upload = root / "abc" / "mole.png"
    upload.write_bytes(b"pixels")
    uploads = Uploads(root, ttl=120)
    assert uploads.take(str(upload)) == b"pixels"
    assert not upload.exists() and not (root / "abc").exists()  # the file and its hash folder
    assert uploads.take(str(upload)) == b"pixels"  # a twin event (the same photo from another tab) gets the bytes
    uploads.forget_old(now=time.monotonic() + 121)
    with pytest.raises(InputError, match="not found"):
        uploads.take(str(upload))  # and only for a while, in memory only
    outside = tmp_path / "patient.txt"
    outside.write_text("keep me")
    for path in [str(outside), str(root / ".." / "patient.txt")]:
        with pytest.raises(InputError, match="not found"):
            uploads.take(path)
    assert outside.read_text() == "keep me"  # never read, never deleted
    with pytest.raises(InputError, match="not found"):
        uploads.take(str(root / "gone.png"))


# -- the running app ---------------------------------------------------------------------------------------------


def test_running_app_configuration(web):
    blocks = web.app.blocks
    assert blocks.server_name == "127.0.0.1" and blocks.share is False and blocks.analytics_enabled is False
    assert blocks.max_file_size == 10 * 2**20 and blocks.show_error is False and blocks.delete_cache == (600, 3600)
    assert blocks._queue.max_size == 16
    assert str(Path(web.app.engine.info.path).resolve()) in blocks.blocked_paths  # never served
    model_events = [fn for fn in blocks.fns.values() if fn.concurrency_id == "model"]
    assert len(model_events) == 7 and all(
        fn.concurrency_limit == 8 for fn in model_events
    )  # max_batch; upload, ask x2, 4
    cache = web.app.cache
    assert os.environ["GRADIO_TEMP_DIR"] == str(cache) and stat.S_IMODE(cache.stat().st_mode) == 0o700
    page = httpx.get(web.url).text
    assert "SkinGPT-4" in page
    assert httpx.get(f"{web.url}gradio_api/file=/etc/hostname").status_code == 403


def test_oversize_upload_is_refused_with_413(web):
    big = b"\0" * (10 * 2**20 + 1)
    response = httpx.post(f"{web.url}gradio_api/upload", files={"files": ("big.png", big)}, timeout=30)
    assert response.status_code == 413
    assert not [p for p in cached_files(web) if p.stat().st_size > 2**20]


def test_upload_is_deleted_at_once_and_no_exif_survives(web, tmp_path):
    original = gps_jpeg()
    c = client(web)
    strip, status, download = c.predict([handle_file(write(tmp_path, "mole.jpg", original))], api_name="/add_photos")
    assert "1 photo(s)" in status and "aria-disabled" in download  # no summary before an answer
    assert cached_files(web) == []  # nothing of the upload on disk
    for thumb in data_uri_images(strip):
        assert not has_metadata(thumb)
    c.close()


def test_bad_photo_and_long_question_are_rejected_in_one_line(web, tmp_path):
    c = client(web)
    _, status, _ = c.predict(
        [handle_file(write(tmp_path, "x.png", b"<html>not a photo</html>"))], api_name="/add_photos"
    )
    assert "Photo 1 was not added" in status and "Traceback" not in status and "No photo yet" in status
    assert not [p for p in cached_files(web) if b"not a photo" in p.read_bytes()]
    history, _, _, status = c.predict("Anything?", *GREEDY, api_name="/ask")
    assert history == [] and "Add a photo" in status
    c.predict([handle_file(write(tmp_path, "ok.png", image_bytes()))], api_name="/add_photos")
    history, kept, _, status = c.predict("x" * 2001, *GREEDY, api_name="/ask")  # the Textbox cap is browser-side
    assert history == [] and "longer than 2000" in status and kept == "x" * 2001
    c.close()


def test_answers_end_with_the_disclaimer_and_show_as_text(web, tmp_path):
    c = client(web)
    c.predict([handle_file(write(tmp_path, "a.png", image_bytes(noise_seed=3)))], api_name="/add_photos")
    job = c.submit("What is this <img src=x>?", *GREEDY, api_name="/ask")
    history, _, download, status = job.result(timeout=60)
    answers = [assistant_texts(out[0])[-1] for out in job.outputs() if assistant_texts(out[0])]
    assert status == "Answered." and all(b.startswith(a) for a, b in zip(answers, answers[1:]))
    assert answers[-1].endswith(html.escape(NOTICE)) and DISCLAIMER not in answers[-1]  # one line per answer
    assert user_texts(history) == ["What is this &lt;img src=x&gt;?"]  # shown as text, never as HTML
    summary = summary_of(download)
    assert "What is this &lt;img src=x&gt;?" in summary and "UNTRAINED" in summary and cached_files(web) == []
    assert web.app.engine.info.model_id in summary and "<th>max new tokens</th><td>4</td>" in summary
    for thumb in data_uri_images(summary):
        assert not has_metadata(thumb)
    history, *_ = c.predict(*GREEDY, api_name="/clinical_4")
    assert user_texts(history)[-1] == html.escape(CLINICAL_PROMPTS[3]) and len(assistant_texts(history)) == 2
    history, status = c.predict(api_name="/stop")  # nothing in progress: the turns that stand are shown
    assert len(assistant_texts(history)) == 2 and "Stopped" in status
    c.predict(api_name="/restart")
    history, _, _, status = c.predict("Again?", *GREEDY, api_name="/ask")
    assert history == [] and "Add a photo" in status
    c.close()


def test_pieces_reach_the_browser_as_they_come(web, tmp_path, monkeypatch):
    """The safety rails release whole sentences (the random tiny model writes none), so pieces are scripted here."""
    sentences = ["First sentence. ", "Second sentence. ", "Third."]

    def scripted(self, question, settings=None, cancel=None):
        for piece in sentences:
            time.sleep(0.05)
            yield piece
        answer = {"role": "assistant", "text": "".join(sentences), "level": "none", "triggers": []}
        self.turns += [{"role": "user", "text": question}, answer]

    monkeypatch.setattr(Consultation, "reply", scripted)
    c = client(web)
    c.predict([handle_file(write(tmp_path, "a.png", image_bytes()))], api_name="/add_photos")
    job = c.submit("Tell me", *GREEDY, api_name="/ask")
    job.result(timeout=60)
    seen = [assistant_texts(out[0])[-1] for out in job.outputs() if assistant_texts(out[0])]
    assert seen[:4] == ["", "First sentence. ", "First sentence. Second sentence. ", "".join(sentences)]
    c.close()


def test_leaving_mid_answer_closes_the_answer_stream(web):
    """Gradio closes the handler's generator on Stop, Restart or a closed tab; the handler must close the answer
    stream it reads (closing it is what cancels generation, in `Consultation.reply` and `Session.stream`)."""
    visit = web.app.new_visit()
    visit.consultation.add_image(image_bytes())
    closed = []

    def endless(question, settings, cancel=None):
        try:
            while True:
                yield "word "
        finally:
            closed.append(question)

    visit.consultation.reply = endless
    answer = web.app.ask("Describe it", *GREEDY, visit)
    next(answer), next(answer), next(answer)  # the question shown, then two pieces
    answer.close()
    assert closed == ["Describe it"]


def test_auth_required_when_set(web, loaded, capsys):
    config = WebConfig(port=free_port(), auth=[("ann", "pw")], login_delay=0.1)
    running = launch(ChatEngine(loaded), config, block=False)
    try:
        assert "web app at http://127.0.0.1" in capsys.readouterr().err  # the address, printed at start
        anonymous = httpx.Client(base_url=running.url)
        assert anonymous.get("config").status_code == 401
        assert anonymous.get("gradio_api/info").status_code == 401
        assert anonymous.post("gradio_api/upload", files={"files": ("a.png", image_bytes())}).status_code == 401
        assert anonymous.post("login", data={"username": "ann", "password": "no"}).status_code == 400
        signed_in = Client(running.url, auth=("ann", "pw"), verbose=False)
        assert signed_in.view_api(print_info=False, return_format="dict")["named_endpoints"] == {}  # no API page
        assert "Stopped" in signed_in.predict(api_name="/stop")[1]  # the app's own events work once signed in
    finally:
        running.close()
    assert not running.app.cache.exists()
    assert os.environ["GRADIO_TEMP_DIR"] == str(web.app.cache)  # the module's app keeps accepting uploads


def test_sixteen_sessions_do_not_cross(web, tmp_path):
    sessions, turns = 16, 5
    photos = [image_bytes(color=(10 * i, 200 - 10 * i, 90)) for i in range(sessions)]
    digests = [hashlib.sha256(p).hexdigest()[:12] for p in photos]

    def visit(i: int):
        c = client(web)
        c.predict([handle_file(write(tmp_path, f"p{i}.png", photos[i]))], api_name="/add_photos")
        latencies = []
        for turn in range(turns):
            start = time.perf_counter()
            history, _, download, _ = c.predict(f"canary{i:02d}z turn {turn}?", *GREEDY, api_name="/ask")
            latencies.append(time.perf_counter() - start)
        summary = summary_of(download)
        c.close()
        return history, summary, latencies

    with ThreadPoolExecutor(sessions) as pool, decode_batches(web.app.engine) as sizes:
        results = list(pool.map(visit, range(sessions)))
    assert max(sizes) >= 2  # turns were decoded in shared batches, which is what could mix them
    crossed = 0
    for i, (history, summary, _) in enumerate(results):
        assert user_texts(history) == [f"canary{i:02d}z turn {t}?" for t in range(turns)]
        others = [j for j in range(sessions) if j != i]
        text = str(history) + summary
        crossed += sum(f"canary{j:02d}z" in text or digests[j] in summary for j in others)
        assert digests[i] in summary
    latencies = sorted(t for _, _, lat in results for t in lat)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    print(f"\nweb sessions={sessions} turns={len(latencies)} cross-talk={crossed} p50={p50:.3f}s p95={p95:.3f}s")
    assert crossed == 0


# -- a real browser ----------------------------------------------------------------------------------------------


def test_browser_flow(web, tmp_path):
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run `apt-get install -y chromium`"
    from playwright.sync_api import expect, sync_playwright

    original, disclaimer = gps_jpeg(), DISCLAIMER.split(". ")[0]
    photo = write(tmp_path, "lesion.jpg", original)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(web.url)
            expect(page.locator("#untrained-banner")).to_contain_text(web.app.engine.info.warning)
            expect(page.locator("#intended-use")).to_contain_text(INTENDED_USE)
            expect(page.get_by_text("Use via API")).to_have_count(0)  # the documented API is `skingpt4 serve`
            expect(page.locator("#download[aria-disabled=true]")).to_have_count(1)  # nothing to sum up yet
            page.locator("input[type=file]").set_input_files(photo)
            expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
            page.locator("#start").click()
            expect(page.locator("#question textarea")).to_have_attribute("placeholder", ASK)
            page.locator("#question textarea").fill("Is this mole changing?")
            page.locator("#question textarea").press("Enter")
            bot = page.locator("#chat [data-testid=bot]")
            expect(bot).to_have_count(1, timeout=30_000)
            expect(bot.first).to_contain_text(NOTICE, timeout=30_000)
            page.locator("#clinical-1").click()
            expect(bot).to_have_count(2, timeout=30_000)
            expect(bot.nth(1)).to_contain_text(NOTICE, timeout=30_000)
            expect(page.locator("#chat [data-testid=user]").nth(1)).to_contain_text(CLINICAL_PROMPTS[0])
            assert page.locator("body").inner_text().count(disclaimer) == 1  # the full text once, below the chat
            with page.expect_download() as download:
                page.locator("#download").click()
            summary = Path(download.value.path()).read_text()
            assert "Is this mole changing?" in summary and INTENDED_USE in summary and summary.count(disclaimer) == 2
            page.locator("#restart").click()
            expect(bot).to_have_count(0, timeout=30_000)
            expect(page.locator("#photo-strip img")).to_have_count(0)
            expect(page.locator("#question textarea")).to_have_attribute("placeholder", ADD_PHOTO)
        finally:
            browser.close()
    assert cached_files(web) == []  # after a download and a Restart nothing of the consultation is on disk


def test_the_chat_panels_own_icons_share_nothing_and_clear_the_consultation(web, tmp_path):
    """No share icon (no share link is promised); the trash icon starts a new consultation, as Restart does, so
    the cleared turns do not come back in the next answer or in the summary."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(web.url)
            page.locator("input[type=file]").set_input_files(write(tmp_path, "lesion.jpg", gps_jpeg()))
            expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
            page.locator("#start").click()
            page.locator("#question textarea").fill("zebra canary question?")
            page.locator("#question textarea").press("Enter")
            bot = page.locator("#chat [data-testid=bot]")
            expect(bot.first).to_contain_text(NOTICE, timeout=30_000)
            icons = page.locator("#chat button[aria-label]")
            labels = [icons.nth(i).get_attribute("aria-label") for i in range(icons.count())]
            assert labels == ["Clear"]  # no share icon (one without a label), no copy-all
            page.locator("#chat button[aria-label='Clear']").click()
            expect(bot).to_have_count(0, timeout=30_000)
            expect(page.locator("#photo-strip img")).to_have_count(0)  # a new consultation: its photo went too
            expect(page.locator("#question textarea")).to_have_attribute("placeholder", ADD_PHOTO)
            page.locator("input[type=file]").set_input_files(write(tmp_path, "other.jpg", gps_jpeg()))
            expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
            page.locator("#start").click()
            page.locator("#question textarea").fill("second question?")
            page.locator("#question textarea").press("Enter")
            expect(bot.first).to_contain_text(NOTICE, timeout=30_000)
            with page.expect_download() as download:
                page.locator("#download").click()
            summary = Path(download.value.path()).read_text()
            assert "second question?" in summary and "zebra canary" not in summary
            assert re.fullmatch(r"consultation-summary-\d{4}-\d\d-\d\d-\d{4}\.html", download.value.suggested_filename)
        finally:
            browser.close()


def test_two_tabs_add_the_same_photo_at_once(web, tmp_path):
    """Gradio stores identical uploads at one path: both events must still get the photo."""
    from playwright.sync_api import expect, sync_playwright

    photo = write(tmp_path, "same.jpg", gps_jpeg())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            pages = [browser.new_context().new_page() for _ in range(3)]
            for page in pages:
                page.goto(web.url)
            for page in pages:
                page.locator("input[type=file]").set_input_files(photo)
            for page in pages:
                expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
                expect(page.locator("#status")).to_contain_text("1 photo(s) in this consultation")
        finally:
            browser.close()
    assert cached_files(web) == []


def test_two_tabs_answer_in_one_batch_and_stop_ends_only_its_own(web, tmp_path):
    """Two visitors ask at once: their answers are decoded together (`scheduler.py`). One presses Stop: that answer
    ends and its question is withdrawn; the other answers to the end, alone from then on. The model is made unable
    to end an answer early, so only Stop or the token limit ends one."""
    from dataclasses import replace

    from conftest import endless
    from playwright.sync_api import expect, sync_playwright

    engine, config = web.app.engine, web.app.config
    saved = (list(engine.suppress_tokens), config.settings)
    endless(engine)
    config.settings = replace(FAST, max_new_tokens=1200)
    sizes: list[int] = []  # rows in each decoding step

    def seen(module, args, kwargs, output):
        if kwargs.get("input_ids") is not None:
            sizes.append(kwargs["input_ids"].shape[0])

    hook = engine.model.language_model.register_forward_hook(seen, with_kwargs=True)
    photo = write(tmp_path, "two.png", image_bytes(noise_seed=5))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                pages = [browser.new_context().new_page() for _ in range(2)]
                for page in pages:
                    page.goto(web.url)
                    page.locator("input[type=file]").set_input_files(photo)
                    expect(page.locator("#photo-strip img")).to_have_count(1, timeout=30_000)
                    page.locator("#start").click()
                    page.locator("#question textarea").fill("What is this?")
                with engine.lock:  # both questions wait for the model, so they start in one batch
                    for page in pages:
                        page.locator("#question textarea").press("Enter")
                    deadline = time.monotonic() + 60
                    while engine.status().waiting < 2 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    assert engine.status().waiting == 2, "both questions should wait for the model"
                deadline = time.monotonic() + 60
                while sizes.count(2) < 20 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert sizes.count(2) >= 20, f"the two answers were not decoded together: {sizes[:40]}"
                pages[0].locator("#stop").click()
                expect(pages[0].locator("#status")).to_contain_text("Stopped", timeout=30_000)
                expect(pages[1].locator("#status")).to_contain_text("Answered.", timeout=120_000)
                bots = [page.locator("#chat [data-testid=bot]") for page in pages]
                expect(bots[0]).to_have_count(0)
                expect(bots[1]).to_have_count(1)
                expect(bots[1].first).to_contain_text(NOTICE)
            finally:
                browser.close()
    finally:
        hook.remove()
        engine.suppress_tokens, config.settings = saved
    together = sizes.count(2)
    print(f"\nweb: {together} steps with both answers in one batch, then {len(sizes) - together} with one")
    assert 20 <= together < 1199 and sizes == [2] * together + [1] * (1199 - together)  # both, then one to the end
    assert cached_files(web) == []


def test_malformed_corpus_through_the_upload(web, tmp_path):
    """Reliability T-1 through the web app's upload: accepted, or refused in one line; nothing of the files stays."""
    import time

    from malformed import image_cases

    c = client(web)
    outcomes, slowest = {"accepted": 0, "refused": 0}, 0.0
    for case in image_cases():
        start = time.perf_counter()
        photo = handle_file(write(tmp_path, f"{case.name}.png", case.data))
        # 60 s catches a hang, not slowness (TimeoutError); the seconds are only reported
        _, status, _ = c.submit([photo], api_name="/add_photos").result(timeout=60)
        slowest = max(slowest, time.perf_counter() - start)
        refused = "Photo 1 was not added" in status
        assert refused == (case.expect == "reject"), (case.name, status)
        assert "Traceback" not in status and all("\n" not in line for line in status.split("\n\n"))  # a line each
        outcomes["refused" if refused else "accepted"] += 1
        for path in cached_files(web):
            data = path.read_bytes()
            assert (len(case.data) < 64 or case.data not in data) and not has_metadata(data), case.name
        c.predict(api_name="/restart")
    c.close()
    print(f"\nweb upload corpus: {sum(outcomes.values())} cases, {outcomes}, slowest {slowest:.2f} s")


def test_sweep_removes_untaken_uploads(tmp_path):
    upload = tmp_path / ("a" * 64) / "mole.jpg"
    upload.parent.mkdir()
    upload.write_bytes(gps_jpeg())
    now = time.time()
    assert sweep(tmp_path, ttl=120, now=now + 60) == 0  # young: its event may still come
    assert sweep(tmp_path, ttl=120, now=now + 121) == 1  # the upload outlived its event
    assert list(tmp_path.iterdir()) == []


def test_stop_mid_answer_cancels_the_model_through_the_server(web, tmp_path):
    """The Stop button's event, sent by a client mid-answer, stops the model within a few token steps and withdraws
    the question (the model is made unable to end its answer, so only Stop can end it early)."""
    from dataclasses import replace

    from conftest import endless

    engine, config = web.app.engine, web.app.config
    saved = (list(engine.suppress_tokens), config.settings)
    endless(engine)
    config.settings = replace(FAST, max_new_tokens=1500)
    steps = []
    hook = engine.model.language_model.register_forward_hook(lambda *a: steps.append(1))
    c = client(web)
    try:
        c.predict([handle_file(write(tmp_path, "s.png", image_bytes()))], api_name="/add_photos")
        job = c.submit("Describe it", *GREEDY, api_name="/ask")
        deadline = time.monotonic() + 30
        while len(steps) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        history, status = c.predict(api_name="/stop")
        at_stop = len(steps)
        for _ in range(40):
            before = len(steps)
            time.sleep(0.25)
            if len(steps) == before:
                break
        after = len(steps) - at_stop
    finally:
        hook.remove()
        engine.suppress_tokens, config.settings = saved
        c.close()
    print(f"\nweb Stop: {at_stop} steps before, {after} after (of 1500 asked)")
    assert 20 <= at_stop < 1500 and after <= 10
    assert assistant_texts(history) == [] and "Stopped" in status
    assert job.done()


def test_the_fifth_photo_is_refused_by_its_number_once(web, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photos = [write(tmp_path, f"p{i}.png", image_bytes(noise_seed=60 + i)) for i in range(5)]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(web.url)
            page.locator("input[type=file]").set_input_files(photos[:4])
            expect(page.locator("#photo-strip img")).to_have_count(4, timeout=30_000)
            page.locator("input[type=file]").set_input_files(photos[4])
            expect(page.locator("#status")).to_contain_text("Photo 5 was not added", timeout=30_000)
            page.wait_for_timeout(1000)  # let any second toast arrive before counting
            toasts = page.get_by_text("Photo 5 was not added")
            assert toasts.count() == 2, page.locator("body").inner_text()  # the status line and one toast
        finally:
            browser.close()


def test_a_stalled_upload_is_closed_at_its_deadline(loaded):
    """The web app's server (Gradio's uvicorn) gets the same slow-client bounds as the API."""
    running = launch(ChatEngine(loaded), WebConfig(port=free_port(), request_timeout_s=2.0), block=False)
    try:
        port = int(running.url.rstrip("/").rsplit(":", 1)[1])
        conn = socket.create_connection(("127.0.0.1", port))
        head = b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        conn.sendall(head + b"Content-Length: 5000\r\n\r\n--b\r\n")  # an upload that stops coming
        conn.settimeout(60)  # a hang guard; the deadline is 2 s
        reply = conn.recv(4096)
        conn.close()
        assert reply.startswith(b"HTTP/1.1 408 Request Timeout")
        assert httpx.get(running.url).status_code == 200
    finally:
        running.close()


def test_a_slow_first_page_is_waited_for(loaded, monkeypatch):
    """Gradio gives the started server 3 s for its first page, then raises that a public share link is needed (CI
    saw it on a loaded machine); the app waits longer for the page instead, and serves."""
    import gradio.networking

    monkeypatch.setattr(gradio.networking, "url_ok", lambda url: False)  # what one answer slower than 3 s leaves
    running = launch(ChatEngine(loaded), WebConfig(port=free_port()), block=False)
    try:
        assert httpx.get(running.url).status_code == 200
    finally:
        running.close()


def test_a_page_that_never_comes_is_said_in_one_line_and_frees_the_port(loaded, monkeypatch):
    import gradio.networking

    from skingpt4.serve import web_launch

    monkeypatch.setattr(gradio.networking, "url_ok", lambda url: False)
    monkeypatch.setattr(web_launch, "answers", lambda url, within: False)
    port = free_port()
    with pytest.raises(InputError, match=f"served no page at http://127.0.0.1:{port}/ in 60 s$"):
        launch(ChatEngine(loaded), WebConfig(port=port), block=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the server that did start is stopped


def test_answers_asks_again_until_a_server_comes():
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(408)  # any status is an answer
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer, bind_and_activate=False)
    server.server_bind()  # the port is this test's; connections are refused until it listens
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        assert not answers(url, 0.3)
        starter = threading.Timer(0.5, lambda: (server.server_activate(), server.serve_forever()))
        starter.daemon = True
        starter.start()
        assert answers(url, 30)
        server.shutdown()
        starter.join()
    finally:
        server.server_close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=40))
def test_any_upload_name_is_taken(web, tmp_path, name):
    """A photo's file name comes from the user's system: whatever it is, the photo is added (the name is unused)."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        path = folder / name
        path.write_bytes(image_bytes())
    except OSError:  # a name this file system cannot hold (too long in bytes): nothing to upload
        return
    c = client(web)
    try:
        _, status, _ = c.predict([handle_file(str(path))], api_name="/add_photos")
        assert "1 photo(s) in this consultation" in status and "Traceback" not in status
    finally:
        c.predict(api_name="/restart")
        c.close()
    assert cached_files(web) == []
