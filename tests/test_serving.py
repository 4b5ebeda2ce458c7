"""Serving the tuned tiny model with `transformers serve`, and the lm-evaluation-harness export (CPU).

The server is the real engine in a subprocess, on 127.0.0.1 and a free port, called with the official
`openai` client; lm-eval is the real `lm_eval` CLI. Both need requirements-test.txt (`make test`
installs it); the tests skip with the install line when the packages are missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# the tiny adapter that answers the sample's first test questions, shared with tests/test_inference.py
from tests.test_inference import adapter_dir, known_rows, one_thread  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parents[1]
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
          "TOKENIZERS_PARALLELISM": "false"}
HANG_GUARD = 600  # seconds; only against a hung subprocess, never a speed assertion
MAX_BYTES = 4 << 20  # the shared server's --max_request_bytes (not the default: the flag is exercised)


def _need(*modules):
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -r requirements-test.txt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(argv, capsys):
    import inference_example
    from pmcvqa_sft.core.errors import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: inference_example.main(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# ---------------------------------------------------------------------------------------------------
# flags and command lines (no engine started)
# ---------------------------------------------------------------------------------------------------


def test_serve_flag_errors_are_one_line(adapter_dir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no `vllm` executable can be found
    code, _, err = _cli(["--adapter", str(adapter_dir), "--serve", "--engine", "vllm"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install vllm" in err
    code, _, err = _cli(["--adapter", str(adapter_dir), "--serve", "--port", "70000"], capsys)
    assert code == 2 and "--port" in err and err.count("\n") == 1
    code, _, err = _cli(["--serve"], capsys)
    assert code == 2 and "--serve needs --adapter" in err
    code, _, err = _cli(["--adapter", str(adapter_dir), "--export_lm_eval", "x"], capsys)
    assert code == 2 and "--dataset_dir" in err
    code, _, err = _cli(["--serve", "--evaluate"], capsys)
    assert code == 2 and "not allowed with" in err


def test_port_in_use_is_one_line(adapter_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = _cli(["--adapter", str(adapter_dir), "--serve", "--port", str(port)], capsys)
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err


def test_engine_dying_before_ready_is_one_line_and_open_host_warns(tmp_path):
    from pmcvqa_sft.infer import serving
    from pmcvqa_sft.core.errors import InputError
    said = []
    with pytest.raises(InputError, match="exited with code 3 before it was ready"):
        serving.run_engine([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, "0.0.0.0", _free_port(),
                           "m", "test", ready_timeout=HANG_GUARD, log=said.append)
    assert any(x.startswith("WARNING: binding to 0.0.0.0") and "no authentication" in x for x in said)


def test_vllm_command_carries_the_run_settings(adapter_dir, tmp_path, monkeypatch):
    from pmcvqa_sft.infer import serving
    from pmcvqa_sft.models.loading import load_tokenizer
    monkeypatch.chdir(tmp_path)
    prep = serving.prepare_vllm(str(adapter_dir), None, "cache", name="my-run", log=lambda *_: None)
    cmd = serving.vllm_command(prep, "127.0.0.1", 8123)
    assert cmd[:3] == ["vllm", "serve", json.loads((adapter_dir / "adapter_config.json").read_text())
                       ["base_model_name_or_path"]]
    assert cmd[cmd.index("--lora-modules") + 1] == f"my-run={adapter_dir.resolve()}" and "--enable-lora" in cmd
    for flag in ("--chat-template", "--generation-config", "--tokenizer"):  # vLLM runs in another folder
        assert Path(cmd[cmd.index(flag) + 1]).is_absolute()
    assert int(cmd[cmd.index("--max-lora-rank") + 1]) >= 16
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    tok = load_tokenizer(str(adapter_dir))
    template = Path(cmd[cmd.index("--chat-template") + 1]).read_text(encoding="utf-8")
    assert template == tok.chat_template  # no run-card system prompt: the training template itself
    gen = json.loads((Path(cmd[cmd.index("--generation-config") + 1]) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    assert cmd[cmd.index("--reasoning-parser") + 1] == "deepseek_r1"


def test_served_template_injects_the_run_card_system_prompt(tiny_tokenizer):
    from pmcvqa_sft.format.encoding import render_prompt
    from pmcvqa_sft.infer.serving import served_chat_template
    tok = __import__("copy").deepcopy(tiny_tokenizer)
    user = [{"role": "user", "content": "Q?"}]
    expected = render_prompt(tok, [{"role": "system", "content": "Be brief."}] + user)
    tok.chat_template = served_chat_template(tiny_tokenizer, "Be brief.")
    assert render_prompt(tok, user) == expected
    own = [{"role": "system", "content": "Other."}] + user
    assert render_prompt(tok, own) == render_prompt(tiny_tokenizer, own)  # a client's own system turn wins


def test_merge_cache_is_keyed_on_the_adapter(adapter_dir, tmp_path):
    from pmcvqa_sft.infer import serving
    from pmcvqa_sft.models.adapters import training_files
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run)
    key = lambda: serving.adapter_key(run, training_files(run)[0], "base", None)  # noqa: E731
    k1 = key()
    assert key() == k1
    card = json.loads((run / "run_card.json").read_text())
    (run / "run_card.json").write_text(json.dumps({**card, "steps": card["steps"] + 1}))
    assert key() != k1
    assert serving.adapter_key(run, training_files(run)[0], "other-base", None) != key()


# ---------------------------------------------------------------------------------------------------
# the real server
# ---------------------------------------------------------------------------------------------------


class _Server:
    """`inference_example.py --serve` in a subprocess; its stdout is collected by a thread."""

    def __init__(self, argv):
        self.proc = subprocess.Popen([sys.executable, "inference_example.py", *argv], cwd=ROOT, env=ENV_1T,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("ready: "):
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> str:
        self.ready.wait(HANG_GUARD)
        ready = [x for x in self.lines if x.startswith("ready: ")]
        assert ready, "server never became ready:\n" + "\n".join(self.lines[-40:])
        return ready[0].split()[1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(HANG_GUARD)


@pytest.fixture(scope="module")
def served(adapter_dir, tmp_path_factory):
    _need("openai", "fastapi", "uvicorn")
    cache = tmp_path_factory.mktemp("serve-cache")
    port = _free_port()
    srv = _Server(["--adapter", str(adapter_dir), "--serve", "--port", str(port), "--serve_cache", str(cache),
                   "--served_model_name", "tiny-run", "--ready_timeout", str(HANG_GUARD),
                   "--max_request_bytes", str(MAX_BYTES)])
    try:
        base_url = srv.wait_ready()
        yield srv, base_url, port, cache
    finally:
        srv.stop()


def _question(known_rows):
    from pmcvqa_sft import prompts
    row = known_rows[0]
    return row, prompts.format_user_prompt(row["question"], row["choices"])


def test_openai_client_gets_the_answer_question_answer(served, adapter_dir, known_rows):
    from openai import OpenAI

    from pmcvqa_sft.format.answers import extract_answer
    from pmcvqa_sft.format.encoding import encode_text, render_prompt
    from pmcvqa_sft.infer.answer import answer_question, build_messages
    from pmcvqa_sft.models.loading import load_tokenizer
    srv, base_url, port, _ = served
    assert base_url == f"http://127.0.0.1:{port}/v1"
    assert any(line.startswith("curl -s " + base_url) for line in srv.lines)
    assert any("from openai import OpenAI" in line for line in srv.lines)
    row, user = _question(known_rows)
    with one_thread():
        ref = answer_question(row["question"], row["choices"], adapter=str(adapter_dir), greedy=True,
                              quantization="none", max_new_tokens=64)
    assert ref.letter == row["answer_label"]

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=HANG_GUARD)
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    r = client.chat.completions.create(model="tiny-run", messages=[{"role": "user", "content": user}],
                                       temperature=0, max_tokens=64)
    msg = r.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning_content") or ""
    served_turn = f"<think>\n{reasoning}\n</think>\n\n{msg.content}"
    assert extract_answer(served_turn, row["choices"]).letter == ref.letter
    assert msg.content.strip() == ref.raw.split("</think>", 1)[1].strip()  # the same greedy answer text
    assert reasoning.strip() == ref.reasoning
    # one BOS, the training prompt: the server's prompt is the toolkit's token for token
    tok = load_tokenizer(str(adapter_dir))
    prompt_ids = encode_text(tok, render_prompt(tok, build_messages(row["question"], row["choices"], None, None)))
    assert r.usage.prompt_tokens == len(prompt_ids)

    stream = client.chat.completions.create(model="tiny-run", messages=[{"role": "user", "content": user}],
                                            temperature=0, max_tokens=64, stream=True)
    content, think = "", ""
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            content += d.content or ""
            think += (d.model_extra or {}).get("reasoning_content") or ""
    assert content.strip() == msg.content.strip() and think.strip() == reasoning.strip()


def test_bad_request_is_4xx_and_the_server_keeps_serving(served, known_rows):
    _srv, base_url, _port, _ = served
    for body in (b"{not json", json.dumps({"model": "tiny-run", "messages": [], "bogus_field": 1}).encode(),
                 json.dumps({"model": "another-model", "messages": [{"role": "user", "content": "x"}]}).encode()):
        req = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=HANG_GUARD)
        assert 400 <= exc.value.code < 500
    _row, user = _question(known_rows)
    ok = urllib.request.Request(f"{base_url}/chat/completions", headers={"Content-Type": "application/json"},
                                data=json.dumps({"model": "tiny-run", "messages": [{"role": "user", "content": user}],
                                                 "temperature": 0, "max_tokens": 32}).encode())
    with urllib.request.urlopen(ok, timeout=HANG_GUARD) as r:
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"]


def test_served_tokenizer_splits_reasoning_from_the_answer(served, known_rows):
    """A model that writes a rationale: the server's own parser (the one behind /v1/chat/completions)
    returns it as reasoning_content and the answer line as content."""
    from types import SimpleNamespace

    from transformers.cli.serving.utils import parse_assistant_message

    from pmcvqa_sft.format.encoding import encode_text, render_prompt
    from pmcvqa_sft.models.loading import load_tokenizer
    _srv, _url, _port, cache = served
    tok = load_tokenizer(str(next(Path(cache).glob("*/tiny-run"))))
    _row, user = _question(known_rows)
    prompt = encode_text(tok, render_prompt(tok, [{"role": "user", "content": user}]))
    reply = encode_text(tok, "Iron stains blue.\n</think>\n\nAnswer: D. Prussian blue") + [tok.eos_token_id]
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    content, reasoning, calls = parse_assistant_message(tok, llama, reply, input_ids=[prompt])
    assert reasoning.strip() == "Iron stains blue." and content.strip() == "Answer: D. Prussian blue"
    assert calls is None


# ---------------------------------------------------------------------------------------------------
# the request guard (infer/serve_engine.py): malformed bodies, size bounds, context clipping, routes
# ---------------------------------------------------------------------------------------------------


def _post(base_url, body, path="/chat/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base_url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HANG_GUARD) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_malformed_bodies_are_400_with_a_message(served, known_rows):
    _srv, base_url, _port, _ = served
    user = {"role": "user", "content": "x"}
    png = "data:image/png;base64,iVBORw0KGgo="
    bad = {
        "messages": [{"model": "tiny-run", "messages": "hi"}, {"model": "tiny-run", "messages": user},
                     {"model": "tiny-run"}, {"model": "tiny-run", "messages": [5]}],
        "content": [{"model": "tiny-run", "messages": [{"role": "user", "content": 5}]},
                    {"model": "tiny-run", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}],
        "role": [{"model": "tiny-run", "messages": [{"role": "robot", "content": "x"}]}],
        "max_tokens": [{"model": "tiny-run", "messages": [user], "max_tokens": -1},
                       {"model": "tiny-run", "messages": [user], "max_tokens": "9"}],
        "temperature": [{"model": "tiny-run", "messages": [user], "temperature": "hot"}],
        "generation_config": [{"model": "tiny-run", "messages": [user], "generation_config": "{}"}],
        "data: URL": [{"model": "tiny-run", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}],
        "takes no images": [{"model": "tiny-run", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "x"}]}]}],
    }
    for word, bodies in bad.items():
        for body in bodies:
            code, out = _post(base_url, body)
            assert code == 400 and word in out["detail"] and "\n" not in out["detail"], (body, code, out)
    _row, text = _question(known_rows)
    code, out = _post(base_url, {"model": "tiny-run", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
    assert code == 200 and out["choices"]


def test_size_bounds_refuse_before_tokenizing(served, known_rows):
    """A body over --max_request_bytes (set to 4 MB by the fixture) is a 413, read and dropped, never parsed;
    a text that cannot fit the prompt-token bound is a 400 before the chat template and tokenizer run;
    the server goes on serving."""
    _srv, base_url, _port, _ = served
    huge = json.dumps({"model": "tiny-run", "messages": [{"role": "user", "content": "w" * (MAX_BYTES + 10)}]})
    code, out = _post(base_url, huge.encode())
    assert code == 413 and f"limit of {MAX_BYTES} bytes" in out["detail"] and "--max_request_bytes" in out["detail"]
    code, out = _post(base_url, {"model": "tiny-run", "messages": [{"role": "user", "content": "word " * 200_000}]})
    assert code == 400 and "at most 1023 prompt tokens" in out["detail"] and "its text alone is at least" in out["detail"]
    _row, text = _question(known_rows)
    code, out = _post(base_url, {"model": "tiny-run", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
    assert code == 200


def test_prompt_bound_is_a_lower_bound_on_the_token_count(adapter_dir):
    """chars // longest vocabulary entry never exceeds the real token count (so nothing that fits is refused)."""
    from pmcvqa_sft.infer import serve_engine
    from pmcvqa_sft.models.loading import load_tokenizer
    tok = load_tokenizer(str(adapter_dir))
    longest = serve_engine.longest_token_chars(tok)
    for text in ("word " * 3000, "Which organ produces bile? " * 200, "x" * 5000, "\n" * 4000):
        assert len(text) // longest <= len(tok(text, add_special_tokens=False)["input_ids"])


def test_max_tokens_is_clipped_to_the_context(served, adapter_dir):
    """A long prompt with a huge max_tokens: prompt + answer never pass the model's context, and the
    finish_reason says why it stopped ("length"), streamed or not."""
    from openai import OpenAI
    from transformers import AutoConfig
    _srv, base_url, _port, _ = served
    ctx = AutoConfig.from_pretrained(json.loads((adapter_dir / "adapter_config.json").read_text())
                                     ["base_model_name_or_path"]).max_position_embeddings
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=HANG_GUARD)
    q = "Question: " + "Which organ produces bile? " * 150
    kw = dict(model="tiny-run", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=100_000)
    r = client.chat.completions.create(**kw)
    assert r.usage.prompt_tokens > ctx // 2 and r.usage.total_tokens <= ctx
    assert r.choices[0].finish_reason == ("length" if r.usage.total_tokens == ctx else "stop")
    reasons = [c.choices[0].finish_reason for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert reasons[-1] == r.choices[0].finish_reason


def test_streamed_content_equals_the_plain_content(served, known_rows):
    from openai import OpenAI
    _srv, base_url, _port, _ = served
    _row, user = _question(known_rows)
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=HANG_GUARD)
    kw = dict(model="tiny-run", messages=[{"role": "user", "content": user}], temperature=0, max_tokens=64)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == plain and not plain.startswith("\n")  # exactly, no strip()


def test_admin_and_raw_routes_are_not_served(served, known_rows):
    _srv, base_url, _port, _ = served
    root = base_url[:-len("/v1")]
    for path in ("/reset", "/load_model", "/v1/completions", "/v1/responses"):
        code, out = _post(root, {"model": "tiny-run"}, path=path)
        assert code == 404 and "not served here" in out["detail"]
    _row, text = _question(known_rows)
    code, _ = _post(base_url, {"model": "tiny-run", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
    assert code == 200  # /reset did not unload the model


def test_served_name_is_the_run_folder(adapter_dir, tmp_path):
    from pmcvqa_sft.infer import serving
    from pmcvqa_sft.models.adapters import find_adapter_dir
    run = tmp_path / "demo-2026"
    shutil.copytree(adapter_dir, run / "model")
    assert serving.run_name(find_adapter_dir(run)) == serving.run_name(find_adapter_dir(run / "model")) == "demo-2026"


def test_guard_flags_reach_the_engine_and_bad_values_are_one_line(adapter_dir, capsys):
    from pmcvqa_sft.infer import serving
    prep = serving.Prepared("m", Path("x"), Path("."), "b", False)
    cmd = serving.transformers_command(prep, "127.0.0.1", 8000, "none", max_request_bytes=5000, max_prompt_tokens=77)
    assert cmd[cmd.index("--max_request_bytes") + 1] == "5000" and cmd[cmd.index("--max_prompt_tokens") + 1] == "77"
    assert cmd.index("--max_prompt_tokens") < cmd.index("--") < cmd.index("m")
    for flag, value in (("--max_request_bytes", "10"), ("--max_prompt_tokens", "0")):
        code, _, err = _cli(["--adapter", str(adapter_dir), "--serve", flag, value], capsys)
        assert code == 2 and flag in err and err.count("\n") == 1


def test_server_stops_cleanly_and_the_merge_is_reused(served, adapter_dir):
    srv, base_url, port, cache = served
    assert srv.stop() == 0
    assert srv.lines[-1] == "engine stopped"
    with pytest.raises(ConnectionRefusedError):  # the engine is gone: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    serving_mod = __import__("pmcvqa_sft.infer.serving", fromlist=["check_port_free"])
    serving_mod.check_port_free("127.0.0.1", port)  # a restart may take the port again
    from pmcvqa_sft.infer import serving
    prep = serving.prepare_merged(str(adapter_dir), None, cache, name="tiny-run", log=lambda *_: None)
    assert prep.reused and (prep.model_dir / "config.json").is_file()
