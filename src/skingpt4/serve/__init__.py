"""Answering people: every surface that puts the model in front of a user, and what they share.

`consult` (a chat with the safety rails and records), `safety` (+ `safety_rules`), `records` (the SQLite store of
consultations), `sandbox` (untrusted image bytes decoded in a child process); the surfaces: `api` (+ `api_schema`,
`limits`: the OpenAI-compatible HTTP API), `web` + `web_launch` (the Gradio app), `terminal` (the chat command)
and `diagnose` (images in bulk, one record per image).
"""
