"""What the chat clients people put in front of the API add to a request, handled in one place.

Open WebUI (the most used self-hosted chat page) does two things a consultation must not see:
- In its native function-calling mode it puts a block before the question naming the files attached to the
  message, `<attached_files><file type="file" id=... url=... name="rc-lesion.jpg"/></attached_files>`: the photo's
  file name (which often names the patient) would become part of the question, the prompt and the records. That
  markup is removed from user text before anything reads it (`without_client_markup`).
- After each answer it asks the same model for a chat title, tags and follow-up questions, with fixed instructions
  that begin `### Task:` and ask for one JSON object. Those are not consultations: a dermatology model would write
  the clinical disclaimer into the JSON, a long history is refused for its length, and they would take places in
  the queue ahead of patients. They are answered at once, without the model, with a neutral JSON object of the
  shape asked for (`task_reply`): a fixed title, no tags, no follow-ups. The patient's text is not sent to the
  model again for them, and the operator can point Open WebUI's task model elsewhere for generated titles.
"""

from __future__ import annotations

import json
import re

ATTACHED = re.compile(r"<attached_files>.*?(</attached_files>|$)|<file\b[^>]*/?>(.*?</file>)?", re.S | re.I)
TASK = re.compile(r"\A\s*### Task:")
JSON_KEY = re.compile(r"JSON format:\s*\{\s*\"(\w+)\"")
NEUTRAL_REPLIES = {  # the key a task's instructions ask for -> a reply that says nothing about the patient
    "title": "Skin consultation",
    "tags": ["Health"],
    "follow_ups": [],
    "queries": [],
    "text": "",
}


def without_client_markup(text: str) -> str:
    """User text without a client's file markup (Open WebUI's `<attached_files>` block and `<file .../>` tags)."""
    cleaned = ATTACHED.sub("", text)
    return cleaned.strip() if cleaned != text else text


def task_reply(question: str) -> str | None:
    """For a client's housekeeping request (Open WebUI's title, tags, follow-ups...: its text begins `### Task:`),
    the JSON reply given without the model; None for a consultation."""
    if not TASK.match(question):
        return None
    key = match.group(1) if (match := JSON_KEY.search(question)) else None
    return json.dumps({key: NEUTRAL_REPLIES.get(key, "")} if key else {})
