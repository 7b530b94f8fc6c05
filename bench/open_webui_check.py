"""Check: Open WebUI's chat page works on `skingpt4 serve` out of the box, and no photo's file name gets through.

Open WebUI is too large for CI (its venv is about 3 GB), so this runs by hand; CI replays the request bodies it
captures (`--capture` writes them to tests/fixtures/open_webui/, read by tests/test_api_clients.py).

What it does: the API on the tiny model in this process (with a record store), Open WebUI 0.12.4 beside it with
offline settings, no login and one OpenAI connection to it, and Chromium driving the chat page: a photo named like a
patient's file (`anna-smith-back.jpg`) is attached and a question asked. It checks that the answer streams in with
the disclaimer, that the chat gets its title, and that the one record kept holds the question without the file name.

Run:  python3 -m venv /tmp/owui && /tmp/owui/bin/pip install torch==2.13.0 open-webui==0.12.4
      python bench/open_webui_check.py --open-webui /tmp/owui/bin/open-webui [--capture]   (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np
from bench_concurrency import serving
from common import print_table
from PIL import Image

from skingpt4.serve.safety import DISCLAIMER

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "open_webui"
QUESTION = "What is this spot on my back?"
FILE_NAME = "anna-smith-back.jpg"
TASKS = {
    "### Task:\nGenerate a concise title": "title",
    "### Task:\nPredict": "follow_ups",
    "### Task:\nGenerate 1-3": "tags",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open-webui", required=True, help="the open-webui command of its own virtual environment")
    parser.add_argument("--capture", action="store_true", help=f"write the request bodies to {FIXTURES}")
    args = parser.parse_args()
    from skingpt4.backends.transformers_llm import load_model
    from skingpt4.engine.chat import ChatEngine
    from skingpt4.serve.records import RecordStore

    with tempfile.TemporaryDirectory(prefix="skingpt4-owui-") as tmp, RecordStore(Path(tmp) / "r.sqlite") as store:
        bodies: list[dict] = []
        engine = ChatEngine(load_model("tiny", device="cpu"))
        with serving(engine, 64, store=store, capture=bodies.append) as url:
            webui = start_open_webui(args.open_webui, f"{url}/v1", Path(tmp))
            try:
                page_text = drive(Path(tmp))
            finally:
                webui.terminate()
                webui.wait(30)
        report(page_text, bodies, [store.get(r["id"]) for r in store.list()])
    if args.capture:
        save(bodies)


def start_open_webui(command: str, api: str, tmp: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATA_DIR": str(tmp / "webui"),
        "WEBUI_AUTH": "False",
        "ENABLE_OLLAMA_API": "False",
        "OPENAI_API_BASE_URL": api,
        "OPENAI_API_KEY": "-",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
    }
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    webui = subprocess.Popen([command, "serve", "--port", "8080"], env=env, cwd=tmp, **quiet)  # its secret key there
    for _ in range(300):
        try:
            if httpx.get("http://127.0.0.1:8080/health", timeout=2).status_code == 200:
                return webui
        except httpx.HTTPError:
            time.sleep(1)
    webui.kill()
    raise SystemExit("Open WebUI did not start on port 8080 within 5 minutes")


def drive(tmp: Path) -> str:
    """A photo and a question through the chat page; the page's text once the answer and its title are in."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    photo = tmp / FILE_NAME
    pixels = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo, "JPEG")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto("http://127.0.0.1:8080", wait_until="domcontentloaded", timeout=60_000)
            try:  # a fresh Open WebUI first shows its release notes
                page.get_by_text("Okay, Let's Go!").click(timeout=20_000)
            except PlaywrightTimeout:
                pass
            page.locator("#chat-input").wait_for(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(photo))
            time.sleep(3)  # the upload is processed before the message can carry it
            page.locator("#chat-input").click()
            page.keyboard.type(QUESTION)
            page.keyboard.press("Enter")
            page.get_by_text("Disclaimer:").first.wait_for(timeout=120_000)
            page.get_by_text("Skin consultation").first.wait_for(timeout=60_000)
            return page.inner_text("body")
        finally:
            browser.close()


def kind(body: dict) -> str:
    """Which request Open WebUI sent: the question ("chat") or one of its housekeeping tasks."""
    text = str(body["messages"][-1].get("content", ""))
    return next((name for start, name in TASKS.items() if text.startswith(start)), "chat")


def report(page_text: str, bodies: list[dict], records: list[dict]) -> None:
    chats = [b for b in bodies if kind(b) == "chat"]
    tasks = sorted(kind(b) for b in bodies if kind(b) != "chat")
    named = FILE_NAME.split("-")[0] in json.dumps(records, default=str).lower()
    rows = [
        ["the answer is on the page, with the disclaimer", str(DISCLAIMER[:40] in page_text)],
        ["the chat got its title", str("Skin consultation" in page_text)],
        [
            "questions sent / tools offered with each",
            f"{len(chats)} / {len(chats[0].get('tools', [])) if chats else 0}",
        ],
        ["housekeeping requests (answered without the model)", ", ".join(tasks) or "none"],
        ["records kept", str(len(records))],
        ["the file name in any record", str(named)],
        ["the recorded question", records[0]["turns"][0]["text"] if records else "-"],
    ]
    print_table("Open WebUI 0.12.4 on skingpt4 serve (tiny model)", ["check", "result"], rows)


def save(bodies: list[dict]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for body in bodies:
        (FIXTURES / f"{kind(body)}.json").write_text(json.dumps(body))
    print(f"wrote {len(bodies)} request bodies to {FIXTURES}")


if __name__ == "__main__":
    main()
