"""What the clients people put in front of the API send (`serve/clients.py`, `serve/api_schema.py`): offered
tools, text response formats, content parts in other shapes, Open WebUI's attached-files markup and its
housekeeping tasks, unknown endpoints, a served model name; every refusal names the field or part."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import image_bytes
from test_api import Server, data_url, user

from skingpt4.serve.api import ServeConfig, create_app
from skingpt4.serve.safety import DISCLAIMER

# Open WebUI 0.12's title instructions, as its chat page sends them after the first answer (abridged history)
TITLE_TASK = """### Task:
Generate a concise, 3-5 word title with an emoji summarizing the chat history.
### Guidelines:
- The title should clearly represent the main theme or subject of the conversation.
### Output:
JSON format: { "title": "your concise title here" }
### Chat History:
<chat_history>
USER: Is this mole on Anna's back changing?
ASSISTANT: It may be a naevus.
</chat_history>"""
TAGS_TASK = TITLE_TASK.replace('JSON format: { "title": "your concise title here" }', 'JSON format: { "tags": [] }')
FIXTURES = Path(__file__).parent / "fixtures" / "open_webui"  # captured by bench/open_webui_check.py --capture
ATTACHED = (
    '<attached_files>\n<file type="file" id="6f1c" url="/api/v1/files/6f1c" content_type="image/jpeg" '
    'name="anna-smith-back.jpg"/>\n</attached_files>\n'
)


@pytest.fixture(scope="module")
def url(loaded, store):
    from skingpt4.engine.chat import ChatEngine

    server = Server(create_app(ChatEngine(loaded), ServeConfig(max_tokens=8, served_model_name="skin-clinic"), store))
    yield server.url
    server.stop()


def post(url: str, path: str = "/v1/chat/completions", **body) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"max_tokens": 4, "temperature": 0, **body}, timeout=60)


def test_offered_tools_get_a_text_answer_that_says_they_were_not_used(url):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for extra in ({"tools": []}, {"tools": [tool]}, {"tools": [tool], "tool_choice": "auto"}):
        for choice in ({}, {"tool_choice": "none"}, {"parallel_tool_calls": False}):
            reply = post(url, messages=[user("What is this?")], **{**extra, **choice})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["choices"][0]["message"]["content"].endswith(DISCLAIMER) and "tool_calls" not in body
            assert body["skingpt4"]["not_acted_on"] == ["tools"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tools": [], "tool_choice": "required"}, "tool_choice: 'required' is not supported"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice: a named function is not"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format: only {'type': 'text'}"),
        (
            {"messages": [user("a"), {"role": "tool", "content": "42", "tool_call_id": "c"}, user("b")]},
            "messages[1]: role 'tool' (a tool's result) is not supported",
        ),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role: 'narrator' is not one of system"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "file", "file": {}}]}]},
            "messages[0].content[1]: part type 'file' is not supported (text, image_url)",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]: a 'image_url'",
        ),
    ],
)
def test_refusals_name_the_field_or_part(url, change, message):
    reply = post(url, **{"messages": [user("hi")], **change})
    assert reply.status_code == 400
    error = reply.json()["error"]["message"]
    assert error.startswith(message) and "\n" not in error, error


def test_other_shapes_of_the_same_content_are_accepted(url):
    photo = data_url(image_bytes())
    shapes = [
        [{"type": "image_url", "image_url": photo}, {"type": "text", "text": "What is this?"}],  # URL as a string
        [{"type": "input_image", "image_url": photo}, {"type": "input_text", "text": "What is this?"}],
        [{"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": "What is this?"}],
    ]
    answers = [post(url, messages=[{"role": "user", "content": shape}]) for shape in shapes]
    assert [a.status_code for a in answers] == [200, 200, 200]
    texts = [a.json()["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] == texts[1] == texts[2]  # the same photo and question, the same greedy answer
    assert post(url, messages=[user("hi")], response_format={"type": "text"}).status_code == 200


def test_a_file_name_in_open_webuis_markup_never_reaches_the_model_or_the_records(url, store):
    before = {r["id"] for r in store.list()}
    content = [
        {"type": "text", "text": ATTACHED + "What is this?"},
        {"type": "image_url", "image_url": {"url": data_url(image_bytes())}},
    ]
    reply = post(url, messages=[{"role": "user", "content": content}])
    plain = post(url, messages=[user("What is this?", image_bytes())])
    assert reply.status_code == 200 and reply.json()["choices"] == plain.json()["choices"]  # the same prompt
    (record,) = [store.get(r["id"]) for r in store.list() if r["id"] not in before][:1]
    assert record["turns"][0]["text"] == "What is this?"
    assert "anna" not in json.dumps([store.get(r["id"]) for r in store.list()]).lower()


def test_open_webuis_title_and_tags_are_answered_without_the_model(url, store):
    before = len(store.list())
    title = post(url, messages=[user(TITLE_TASK)], max_tokens=1000)  # above the server's --max-tokens: no matter
    assert title.status_code == 200
    assert json.loads(title.json()["choices"][0]["message"]["content"]) == {"title": "Skin consultation"}
    long_tags = TAGS_TASK.replace("</chat_history>", "x " * 3000 + "</chat_history>")  # 6,000+ characters
    tags = post(url, messages=[user(long_tags)], stream=True)
    chunks = [json.loads(line[6:]) for line in tags.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert json.loads(text) == {"tags": ["Health"]} and tags.text.rstrip().endswith("data: [DONE]")
    assert len(store.list()) == before  # not a consultation: nothing recorded


def test_unknown_endpoints_answer_in_openais_error_shape(url):
    responses = httpx.post(f"{url}/v1/responses", json={"input": "hi"}, timeout=10)
    assert responses.status_code == 404
    assert responses.json()["error"]["message"] == (
        "POST /v1/responses: the Responses API is not offered here; use POST /v1/chat/completions"
    )
    missing = httpx.get(f"{url}/v2/anything", timeout=10)
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error"]["message"].endswith("method not allowed here")


def test_the_served_model_name_is_what_clients_see_and_records_keep_the_models_own(url, store):
    assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "skin-clinic"
    reply = post(url, messages=[user("hi")])
    assert reply.json()["model"] == "skin-clinic"
    newest = store.get(store.list()[0]["id"])
    assert newest["model_id"].startswith("model@")  # the folder's name and fingerprint


def test_litellm_text_photo_and_stream(url):
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its price table from the package, not the web
    import litellm

    base = dict(model="openai/skin-clinic", api_base=f"{url}/v1", api_key="-", max_tokens=4, temperature=0)
    text = litellm.completion(messages=[user("Is it eczema?")], **base).choices[0].message.content
    photo = litellm.completion(messages=[user("What is this?", image_bytes())], **base).choices[0].message.content
    streamed = litellm.completion(messages=[user("What is this?", image_bytes())], stream=True, **base)
    joined = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text.endswith(DISCLAIMER) and photo.endswith(DISCLAIMER) and joined == photo


def test_langchain_text_photo_and_stream(url):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{url}/v1", api_key="-", model="skin-clinic", max_tokens=4, temperature=0)
    text = chat.invoke("Is it eczema?").content
    photo_message = HumanMessage(
        content=[
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(image_bytes())}},
        ]
    )
    photo = chat.invoke([photo_message]).content
    joined = "".join(chunk.content for chunk in chat.stream([photo_message]))
    assert text.endswith(DISCLAIMER) and photo.endswith(DISCLAIMER) and joined == photo
    plain = post(url, messages=[user("What is this?", image_bytes())]).json()["choices"][0]["message"]["content"]
    assert photo == plain  # the same request as the OpenAI SDK's, the same answer


def test_open_webuis_own_requests_replayed(url, store):
    """The bodies Open WebUI 0.12.4's chat page sent for one question with a photo named like a patient's file
    (captured from a real run by bench/open_webui_check.py): the question, with its 36 built-in tools and its
    attached-files markup, is answered and recorded without the file name; its title, follow-up and tags requests
    are answered without the model and recorded nowhere."""
    before = {r["id"] for r in store.list()}
    chat = json.loads((FIXTURES / "chat.json").read_text())
    assert len(chat["tools"]) == 36 and "anna-smith-back.jpg" in json.dumps(chat)  # as it was sent
    reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert reply.status_code == 200 and "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    (record,) = [store.get(r["id"]) for r in store.list() if r["id"] not in before]
    assert record["turns"][0]["text"] == "What is this spot on my back?" and len(record["images"]) == 1
    assert "anna" not in json.dumps(record, default=str).lower()
    expected = {
        "title": {"title": "Skin consultation"},
        "follow_ups": {"follow_ups": []},
        "tags": {"tags": ["Health"]},
    }
    for name, answer in expected.items():
        task = httpx.post(f"{url}/v1/chat/completions", json=json.loads((FIXTURES / f"{name}.json").read_text()))
        assert task.status_code == 200 and json.loads(task.json()["choices"][0]["message"]["content"]) == answer
    assert len(store.list()) == len(before) + 1  # the consultation alone
