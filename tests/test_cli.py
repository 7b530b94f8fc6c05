"""The command line: every command runs, errors are one line with a non-zero exit, --help has examples."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import image_bytes

from skingpt4.cli.main import main
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import SkinGPT4Error
from skingpt4.serve.safety import DISCLAIMER, INTENDED_USE
from skingpt4.serve.terminal import HELP, run_chat


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert "example:" in capsys.readouterr().out
    assert main([]) == 2


def test_create_tiny_model_and_diagnose(tmp_path, capsys):
    assert main(["create-tiny-model", str(tmp_path / "tiny")]) == 0
    assert "UNTRAINED" in capsys.readouterr().out
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes())
    (tmp_path / "in" / "b.png").write_bytes(b"nope")
    out = tmp_path / "r.jsonl"
    args = ["diagnose", "--model", str(tmp_path / "tiny"), str(tmp_path / "in"), "--out", str(out)]
    code = main([*args, "--greedy", "--max-new-tokens", "4", "--no-progress", "--clinical"])
    captured = capsys.readouterr()
    assert code == 1 and "1 diagnosed, 1 failed, 0 already done" in captured.out and "UNTRAINED" in captured.err
    assert f"failed: {tmp_path / 'in' / 'b.png'}: not an image file" in captured.err  # the failing file, named
    assert main([*args, "--greedy", "--max-new-tokens", "4", "--no-progress", "--clinical"]) == 1  # a rerun
    captured = capsys.readouterr()
    assert (
        "0 diagnosed, 0 failed, 2 already done" in captured.out
        and "1 of them failed on an earlier run" in captured.err
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and len(records[0]["answers"]) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--model", "/no/such/model"], "error: model folder not found: /no/such/model"),
        (["diagnose", "--model", "tiny", "x.png", "--out", "o.txt"], "error: no such file or folder: x.png"),
        (["chat", "--model", "tiny", "--temperature", "9"], "error: temperature must be in [0, 5] (0: greedy)"),
        (["chat", "--model", "tiny", "--image", "notes.txt"], "error: no such file: notes.txt"),
        (
            ["chat", "--model", "tiny", "--image", str(Path(__file__).parents[1] / "README.md")],
            "error: not an image file",
        ),
        (["serve", "--model", "tiny", "--max-tokens", "100000"], "error: --max-tokens must be 1..1999 (the context"),
        (["chat", "--model", "tiny", "--load-in-4bit"], "error: 8-bit and 4-bit loading need a CUDA GPU"),
        (["chat", "--model", "tiny", "--template", "vicuna"], "error: unknown template 'vicuna'"),
        (["serve", "--model", "tiny", "--max-batch", "0"], "error: --max-batch must be at least 1"),
        (["convert", "--out", "o", "--llm", "l", "--projection", "p.pth"], "error: give either --vit and --qformer"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_terminal_chat_commands(engine, tmp_path):
    photo = tmp_path / "lesion.png"
    photo.write_bytes(image_bytes())
    script = f"/image {photo}\nWhat's wrong with my skin?\n/image {tmp_path}/missing.png\n/save {tmp_path}/t.json\n"
    script += "/reset\n/help\n/quit\n"
    out = io.StringIO()
    code = run_chat(engine, GenerationSettings.greedy(max_new_tokens=5), stdin=io.StringIO(script), stdout=out)
    text = out.getvalue()
    assert code == 0 and "WARNING: UNTRAINED" in text and "(image added: sha256" in text
    assert "error: no such file: missing.png" in text and "(new consultation" in text and "/image PATH" in text
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["turns"][0]["text"] == "What's wrong with my skin?" and len(saved["images"]) == 1
    assert [t["role"] for t in saved["turns"]] == ["user", "assistant"]
    assert saved["turns"][1]["text"].endswith(DISCLAIMER) and text.startswith(INTENDED_USE)


def test_terminal_chat_stops_when_a_starting_photo_is_bad(engine, tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    out = io.StringIO()
    code = run_chat(engine, GenerationSettings(), [str(tmp_path / "notes.txt")], io.StringIO("hello\n"), out)
    assert code == 2 and "error: not an image file" in out.getvalue() and "skingpt4>" not in out.getvalue()


def test_temperature_zero_is_greedy_everywhere():
    from argparse import Namespace

    from skingpt4.cli import flags

    assert GenerationSettings(temperature=0).do_sample is False
    given = {name: None for name in flags.GENERATION_FLAGS}
    assert flags.settings(Namespace(**{**given, "greedy": False, "temperature": 0.0})).do_sample is False


def test_terminal_chat_ends_at_eof(loaded):
    out = io.StringIO()
    assert run_chat(ChatEngine(loaded), GenerationSettings(), stdin=io.StringIO(""), stdout=out) == 0


def test_the_chat_prompt_shows_while_the_model_loads(engine):
    """With a model still loading, the prompt comes first; the first question waits for the model, then its
    warning, then the answer."""
    loading, out = Future(), io.StringIO()

    class Typist:  # types a question once the prompt is shown; the model finishes loading only then
        lines, seen = ["What is it?\n", "/quit\n"], []

        def readline(self):
            self.seen.append((out.getvalue(), loading.done()))
            if not loading.done():
                loading.set_result(engine)
            return self.lines.pop(0)

    typist = Typist()
    assert run_chat(loading, GenerationSettings.greedy(max_new_tokens=3), stdin=typist, stdout=out) == 0
    assert typist.seen[0] == (f"{INTENDED_USE}\n{HELP}\nyou> ", False)
    text = out.getvalue()
    assert text.index("WARNING: UNTRAINED") < text.index("skingpt4> ") < text.index(DISCLAIMER)


def test_a_model_that_fails_to_load_is_reported_at_the_first_question(capsys, monkeypatch):
    from skingpt4.cli import flags
    from skingpt4.errors import ModelLoadError

    def broken(args):
        raise ModelLoadError("cannot load the model in x: damaged file")

    monkeypatch.setattr(flags, "engine", broken)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", "tiny"]) == 2
    captured = capsys.readouterr()
    assert "you> " in captured.out and captured.err == "error: cannot load the model in x: damaged file\n"


def test_commands_start_without_importing_torch():
    """`--help` of every command, and the chat up to its prompt, import neither torch nor transformers (the chat's
    model load is held back here, to show that nothing else imports them)."""
    code = """
import io, sys, threading
from skingpt4.cli import flags
from skingpt4.cli.main import build_parser, main
held = threading.Event()
flags.engine = lambda args: held.wait()
for name in [None, *build_parser()._subparsers._group_actions[0].choices]:
    try:
        main([name, "--help"] if name else ["--help"])
    except SystemExit:
        pass
sys.stdin = io.StringIO("/quit\\n")
code = main(["chat", "--model", "tiny"])
print("RESULT", code, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "you> " in result.stdout and result.stdout.strip().endswith("RESULT 0 []"), result.stderr[-2000:]


def test_convert_command(tmp_path, lavis_files, llm_dir, dims, capsys):
    common = [
        "--vit",
        str(lavis_files["vit"]),
        "--qformer",
        str(lavis_files["qformer"]),
        "--llm",
        str(llm_dir),
        "--projection",
        str(lavis_files["proj"]),
        "--vit-heads",
        str(dims.vit_heads),
        "--qformer-heads",
        str(dims.qformer_heads),
    ]
    assert main(["convert", *common, "--out", str(tmp_path / "m"), "--shard-size-gb", "0.00005"]) == 0
    assert "converted into" in capsys.readouterr().out
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    assert main(["convert", *common, "--out", str(tmp_path / "n"), "--template", "alpaca"]) == 2
    assert "unknown template 'alpaca'" in capsys.readouterr().err


def test_records_export_into_a_closed_pipe_stops_quietly(tmp_path):
    """`skingpt4 records export | head -1`: the reader stops early; no 'Broken pipe' error, the status of a pipe's
    writer whose reader left (141, as `cat` gives)."""
    from skingpt4.serve.records import RecordStore

    db = tmp_path / "records.sqlite"
    with RecordStore(db) as store:
        for _ in range(400):
            store.save({"surface": "chat", "model_id": "m", "turns": [{"role": "user", "text": "q" * 500}]})
    script = (
        f"{sys.executable} -m skingpt4 records export --records {db} | head -c 10 > /dev/null; echo ${{PIPESTATUS[0]}}"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "141" and "Broken pipe" not in done.stderr and "Exception" not in done.stderr


def test_records_commands(tmp_path, capsys):
    from skingpt4.serve.records import RecordStore

    db = tmp_path / "records.sqlite"
    with RecordStore(db) as store:
        ids = [
            store.save({"surface": "chat", "model_id": "m", "turns": [{"role": "user", "text": f"q{i}"}]})
            for i in range(3)
        ]
    assert main(["records", "list", "--records", str(db)]) == 0
    listed = capsys.readouterr().out
    assert all(i in listed for i in ids) and "1 turns" in listed
    assert main(["records", "export", "--records", str(db), "--out", str(tmp_path / "all.jsonl")]) == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 3
    assert main(["records", "list", "--records", str(db), "--id", ids[1]]) == 0
    assert capsys.readouterr().out.splitlines() == [line for line in listed.splitlines() if ids[1] in line]
    assert main(["records", "delete", "--records", str(db), "--id", "nope"]) == 2  # names nothing: not a no-op
    assert capsys.readouterr().err.startswith("error: no record with id nope in ")
    assert main(["records", "delete", "--records", str(db), "--id", ids[0]]) == 0
    assert main(["records", "delete", "--records", str(db)]) == 2  # says which selection is missing
    assert "exactly one of --id, --all" in capsys.readouterr().err
    assert main(["records", "delete", "--records", str(db), "--all"]) == 2  # no terminal to confirm on
    assert "nothing deleted (--yes deletes without asking)" in capsys.readouterr().err
    assert main(["records", "delete", "--records", str(db), "--all", "--yes"]) == 0
    assert "deleted 2 records" in capsys.readouterr().out
    assert main(["records", "list", "--records", str(db)]) == 0
    assert "no records in" in capsys.readouterr().err
    assert main(["chat", "--model", "tiny", "--keep-images"]) == 2
    assert "take effect with --record" in capsys.readouterr().err
    assert main(["records", "list", "--records", str(tmp_path / "typo.sqlite")]) == 2
    assert "no records database at" in capsys.readouterr().err and not (tmp_path / "typo.sqlite").exists()


def test_diagnose_output_on_the_terminal_holds_no_file_names_or_questions(tiny_dir, tmp_path, capsys):
    photo = tmp_path / "Smith_John_MRN123.png"
    photo.write_bytes(image_bytes())
    out = tmp_path / "out.jsonl"
    argv = [
        "diagnose",
        "--model",
        str(tiny_dir),
        str(photo),
        "--out",
        str(out),
        "--greedy",
        "--max-new-tokens",
        "2",
        "--prompt",
        "zebracanary77?",
        "--record",
        "--records",
        str(tmp_path / "r.sqlite"),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    terminal = printed.out.replace(str(out), "") + printed.err  # the summary line names the output file itself
    assert "Smith_John" not in terminal and "zebracanary77" not in terminal and "1 diagnosed" in terminal


def test_serve_finishes_in_flight_work_on_sigterm_and_logs_no_patient_text(tiny_dir, tmp_path):
    """A real `skingpt4 serve`: warm-up, three streamed answers survive SIGTERM, exit 0, no question text in its
    output."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SKINGPT4_API_KEY": "k"}
    cmd = [
        sys.executable,
        "-m",
        "skingpt4",
        "serve",
        "--model",
        str(tiny_dir),
        "--port",
        str(port),
        "--record",
        "--records",
        str(tmp_path / "r.sqlite"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        photo = "data:image/png;base64," + __import__("base64").b64encode(image_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": "zebracanary77 ok?"}]
        body = {"messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": 200}
        started = threading.Barrier(4)

        def consult(_) -> list[str]:
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=30
            ) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                started.wait(30)
                return [line for line in lines if line]

        with ThreadPoolExecutor(3) as pool:
            streams = pool.map(consult, range(3))
            started.wait(30)
            proc.send_signal(signal.SIGTERM)  # mid-answer, three answers in flight
            ends = [rest[-1] for rest in streams]
        assert ends == ["data: [DONE]"] * 3  # the in-flight answers were finished, not cut
        output, _ = proc.communicate(timeout=40)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "zebracanary77" not in output and "serving" in output


def test_small_cli_edges(tmp_path, capsys, monkeypatch):
    assert main(["create-tiny-model", "--out", str(tmp_path / "t")]) == 0 and (tmp_path / "t" / "config.json").exists()
    assert main(["create-tiny-model"]) == 2 and "give the folder to create once" in capsys.readouterr().err
    folder = tmp_path / "converted-13b"  # a model folder, mistyped as the tiny model's destination
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "blip-2"}')
    (folder / "model.safetensors.index.json").write_text("{}")
    assert main(["create-tiny-model", str(folder)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {folder} exists and is not an empty folder: give a new folder for the tiny model\n"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors.index.json"]
    assert (folder / "config.json").read_text() == '{"model_type": "blip-2"}'  # untouched

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("skingpt4.serve.diagnose.diagnose", interrupted)
    (tmp_path / "a.png").write_bytes(image_bytes())
    argv = ["diagnose", "--model", str(tmp_path / "t"), str(tmp_path / "a.png"), "--out", str(tmp_path / "r.jsonl")]
    assert main(argv) == 130
    assert capsys.readouterr().err.endswith("interrupted (run the same command again to resume where it stopped)\n")


def test_a_busy_port_is_one_line_naming_the_flag(engine):
    import socket

    from skingpt4.serve.web_launch import WebConfig, launch

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SkinGPT4Error, match=f"port {port} on 127.0.0.1 is in use; choose another with --port"):
            launch(engine, WebConfig(port=port), block=False)


def endless_folder(tiny_dir: Path, folder: Path) -> Path:
    """A copy of the tiny model folder that never ends an answer early (`folder.tiny.without_endings`)."""
    import shutil

    from skingpt4.folder.tiny import without_endings

    shutil.copytree(tiny_dir, folder)
    return without_endings(folder)


@pytest.mark.skipif(sys.platform == "win32", reason="sends a real SIGINT to a child process: POSIX signals only")
def test_ctrl_c_during_a_streamed_answer_exits_130_with_the_question_withdrawn(tiny_dir, tmp_path):
    """A real SIGINT while the chat streams a long answer: exit 130 (not an abort from a model thread killed at
    exit), and the consultation's record holds the photo but not the interrupted question."""
    import os
    import signal
    import threading
    import time

    from skingpt4.serve.records import RecordStore

    model = endless_folder(tiny_dir, tmp_path / "endless")
    (tmp_path / "lesion.png").write_bytes(image_bytes(noise_seed=3))
    records = tmp_path / "records.sqlite"
    argv = [sys.executable, "-m", "skingpt4", "chat", "--model", str(model), "--greedy", "--max-new-tokens", "1500"]
    argv += ["--image", str(tmp_path / "lesion.png"), "--record", "--records", str(records)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT dumps every thread's stack (used on a hang below)
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Ctrl+C as in a terminal: a run started in the background by a shell without job control (`cmd &` in a
    # script) ignores SIGINT, and its children inherit that; the chat would then never see the signal.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    chat = subprocess.Popen(argv, env=env, preexec_fn=default_sigint, **pipes)
    seen, errors, answering = [], [], threading.Event()

    def read():
        while char := chat.stdout.read(1):
            seen.append(char)
            if "".join(seen[-10:]) == "skingpt4> ":
                answering.set()

    threading.Thread(target=read, daemon=True).start()
    draining = threading.Thread(target=lambda: errors.extend(chat.stderr), daemon=True)  # never a full pipe
    draining.start()
    chat.stdin.write("What is this rash on my arm?\n")
    chat.stdin.flush()
    assert answering.wait(120), "".join(seen)
    time.sleep(1.0)  # well into the 1500-token answer
    os.kill(chat.pid, signal.SIGINT)
    try:
        code = chat.wait(60)
    except subprocess.TimeoutExpired:
        chat.send_signal(signal.SIGABRT)
        draining.join(10)
        raise AssertionError("no exit within 60 s of SIGINT; its threads:\n" + "".join(errors)[-6000:]) from None
    finally:
        chat.kill()
    draining.join(10)
    err = "".join(errors)
    assert code == 130 and "terminate called" not in err and "Aborted" not in err, err
    with RecordStore(records) as store:
        (record,) = [store.get(r["id"]) for r in store.list()]
    assert len(record["images"]) == 1 and record["turns"] == []  # the question was withdrawn, not half-kept


@pytest.mark.parametrize("command", ["serve", "demo", "review"])
def test_a_busy_port_is_refused_before_anything_loads(command, tmp_path, capsys, monkeypatch):
    """One line, exit 2, and no model loaded (minutes for 13B) nor transcripts read first."""
    import socket

    def never(*args, **kwargs):
        raise AssertionError("loaded before the port was checked")

    monkeypatch.setattr("skingpt4.engine.factory.open_engine", never)
    monkeypatch.setattr("skingpt4.review.page.serve_review", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        target = [str(tmp_path / "transcripts.jsonl")] if command == "review" else ["--model", "tiny"]
        assert main([command, *target, "--port", str(port)]) == 2
    assert capsys.readouterr().err.endswith(f"error: port {port} on 127.0.0.1 is in use; choose another with --port\n")


def test_a_folder_named_tiny_here_wins_over_the_built_in_tiny_model(tmp_path, monkeypatch, capsys):
    """`create-tiny-model ./tiny` then `--model tiny` uses that folder (and says which model it uses)."""
    from skingpt4.folder.meta import model_folder

    monkeypatch.chdir(tmp_path)
    assert model_folder("tiny") is None  # no such folder here: the built-in one
    assert main(["create-tiny-model", "tiny", "--seed", "3"]) == 0
    assert model_folder("tiny") == Path("tiny")
    (tmp_path / "a.png").write_bytes(image_bytes())
    argv = ["diagnose", "--model", "tiny", "a.png", "--out", "r.jsonl", "--greedy", "--max-new-tokens", "4"]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"in {Path('tiny')}\n" in err and "model: " in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["diagnose", "x.png", "--out", "r.jsonl", "--num-beams", "3", "--quantize", "int4"],
            "--num-beams: beam search",
        ),
        (["eval", "--data", "d.jsonl", "--out", "o", "--mode", "choice", "--quantize", "int8"], "--mode choice reads"),
        (["chat", "--num-beams", "2", "--quantize", "int4"], "--num-beams: beam search"),
        (["serve", "--quantize", "int4", "--device", "cuda"], "--quantize runs the LLM on the CPU"),
        (["demo", "--max-batch", "0"], "--max-batch must be at least 1"),
        (["serve", "--queue-size", "-1"], "--queue-size must be 0 or more"),
    ],
)
def test_flag_conflicts_are_refused_before_any_loading_or_conversion(argv, message, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded or converted before the flags were checked")

    monkeypatch.setattr("skingpt4.backends.llamacpp.load_quantized", never)
    monkeypatch.setattr("skingpt4.backends.transformers_llm.load_model", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.png").write_bytes(image_bytes())
    assert main([argv[0], "--model", "tiny", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_diagnose_edges_say_what_they_did(tmp_path, capsys):
    """Files that are not images are counted, a rejected image has no answering time, an --out folder that does
    not exist and an empty --prompt are refused before anything loads."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(image_bytes())
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "notes.txt").write_text("patient notes")
    (photos / "scan.pdf").write_bytes(b"%PDF-1.4")
    base = ["diagnose", "--model", "tiny", str(photos), "--greedy", "--max-new-tokens", "4", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "missing" / "r.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: --out: no such folder {tmp_path / 'missing'} (create it first)\n"
    assert not (tmp_path / "missing").exists()
    assert main([*base, "--out", str(tmp_path / "r.jsonl"), "--prompt", " "]) == 2
    assert capsys.readouterr().err == "error: --prompt is empty: give the question to ask\n"
    assert main([*base, "--out", str(tmp_path / "r.jsonl")]) == 1  # one image failed
    assert "skipped 2 files in the folders that are not images" in capsys.readouterr().err
    records = {Path(r["image"]).name: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert records["a.png"]["seconds"] > 0 and records["broken.jpg"]["seconds"] is None
    assert records["broken.jpg"]["error"] and records["a.png"]["error"] is None


def test_terminal_chat_shows_the_disclaimer_in_full_once_and_says_when_no_photo_was_added(engine, tmp_path):
    from skingpt4.serve.terminal import NO_PHOTO, NOTICE

    script = "What is it?\nAnd the cause?\n/save " + str(tmp_path / "t.json") + "\n/quit\n"
    out = io.StringIO()
    assert run_chat(engine, GenerationSettings.greedy(max_new_tokens=4), stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    assert text.count(DISCLAIMER) == 1 and text.count(NOTICE) == 1  # full after the first answer, one line after
    assert text.count(NO_PHOTO) == 1 and text.index(NO_PHOTO) < text.index("skingpt4> ")
    saved = json.loads((tmp_path / "t.json").read_text())
    assert all(t["text"].endswith(DISCLAIMER) for t in saved["turns"] if t["role"] == "assistant")  # kept in full


def test_demo_upload_cap_is_a_flag_within_what_the_loader_reads(capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded before the flag was checked")

    monkeypatch.setattr("skingpt4.engine.factory.open_engine", never)
    assert main(["demo", "--model", "tiny", "--max-image-mb", "80"]) == 2
    assert (
        capsys.readouterr().err == "error: --max-image-mb must be in (0, 50] (the image loader reads 50 MiB at most)\n"
    )
