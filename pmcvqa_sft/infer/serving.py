"""`--serve`: the tuned model behind an OpenAI-compatible endpoint, run by an existing engine.

No home-made server: this module only prepares what an engine needs and looks after its process.
- `transformers serve` (CPUs, small GPUs): it loads one local folder (`force_model`), so the adapter is
  merged into the base once (`inference.merge_and_save`, unquantized) into a cache folder keyed on a
  hash of the adapter files, the training tokenizer, the run card and the base; an unchanged adapter
  reuses it. The merged folder gets the run's serving settings (`served_tokenizer_files`): the training
  chat template with the run card's system prompt as the default system turn, a `response_template`
  that hands the think block back as `reasoning_content`, and `generation_config.json` from the model's
  own generation settings (`generation.GenerationSettings`). The folder is named after the run and the
  server is started inside the cache entry, so the model name clients send is the run's name.
- vLLM (`--engine vllm`, GPUs): `vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER` with the
  same chat template file, generation config folder and DeepSeek's reasoning parser.
Lifecycle: the engine runs as a child process in its own session; `/v1/models` is polled until it
answers (bounded wait); one ready line with the base URL, then the `curl` and `openai` lines; Ctrl-C or
SIGTERM is forwarded to the engine, which is waited for (and killed after a grace period).
The engines have no authentication: bind to 127.0.0.1 (the default) or put them behind a proxy.
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from .. import prompts
from ..core.atomic import atomic_dir
from ..core.errors import InputError

ENGINES = ("transformers", "vllm")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_READY_TIMEOUT = 900.0   # an 8B model loads in minutes from a cold disk
DEFAULT_MAX_REQUEST_BYTES = 16 << 20   # --max_request_bytes default: a few figures as base64 data URLs
SERVE_FORMAT = 2                # bump when what goes into a merged serving folder changes
KEY_FILE = "serve_key.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
VLLM_INSTALL = "pip install vllm"
SERVING_INSTALL = 'pip install "transformers[serving]"'
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "pmcvqa_sft" / "served"


def check_serve_args(engine: str, host: str, port: int, ready_timeout: float, max_request_bytes: int | None = None,
                     max_prompt_tokens: int | None = None) -> None:
    """One-line errors for the serving flags, before any model loads."""
    if max_request_bytes is not None and max_request_bytes < 1024:
        raise InputError(f"--max_request_bytes must be at least 1024, got {max_request_bytes}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise InputError(f"--max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {port}")
    if not host.strip():
        raise InputError("--host is empty")
    if ready_timeout <= 0:
        raise InputError(f"--ready_timeout must be positive, got {ready_timeout}")
    if engine == "vllm":
        if shutil.which("vllm") is None:
            raise InputError(f"--engine vllm needs vLLM, which is not installed here: {VLLM_INSTALL} "
                             f"(Linux with a CUDA GPU), or serve with --engine transformers")
    else:
        import importlib.util
        missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(f"transformers serve needs {', '.join(missing)}: {SERVING_INSTALL}")


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the engines bind (SO_REUSEADDR): a port left in TIME_WAIT by a stopped server is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port") from None


# ---------------------------------------------------------------------------------------------------
# what the served model must carry: template, system prompt, think handling, generation defaults
# ---------------------------------------------------------------------------------------------------


def served_chat_template(tokenizer, system_prompt: str | None) -> str:
    """The training chat template; with a run-card system prompt it becomes the default system turn
    (a request that sends its own system message keeps it), exactly as `answer_question` builds it."""
    from ..format.encoding import ensure_chat_template
    tmpl = ensure_chat_template(tokenizer).chat_template
    if isinstance(tmpl, dict):
        raise InputError("the tokenizer has several named chat templates; serving needs one")
    if not system_prompt:
        return tmpl
    lit = json.dumps(system_prompt)  # a JSON string is a valid Jinja string literal
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = [{'role': 'system', 'content': " + lit + "}] + messages %}"
            "{%- endif %}" + tmpl)


def response_template(tokenizer, chat_template: str) -> dict | None:
    """`tokenizer.response_template` for `transformers serve`: the generation prompt opens the think
    block (DeepSeek's `<｜Assistant｜><think>\\n`), so the reply is reasoning up to `</think>`, then the
    answer up to EOS. None when the template does not open a think block (the text is returned raw)."""
    from ..format.encoding import _generation_tail
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = chat_template
        tail = _generation_tail(tokenizer, [{"role": "user", "content": "x"}])
    finally:
        tokenizer.chat_template = saved
    open_tag = prompts.THINK_OPEN.strip()
    if not tail.endswith(prompts.THINK_OPEN) or not tokenizer.eos_token:
        return None
    anchor = tail[:-len(prompts.THINK_OPEN)]
    if not anchor:
        return None
    return {"defaults": {"role": "assistant"}, "start_anchor": anchor,
            # the blank lines after </think> are part of the close tag (longest match wins, streamed or not),
            # so streamed content does not start with "\n\n" where the plain answer does not
            "fields": {"reasoning_content": {"open": open_tag, "close": [prompts.THINK_CLOSE + "\n\n",
                                                                         prompts.THINK_CLOSE + "\n",
                                                                         prompts.THINK_CLOSE], "content": "text"},
                       "content": {"close": tokenizer.eos_token, "content": "text"}}}


def generation_defaults(model_dir, tokenizer) -> dict:
    """generation_config.json content: the model's own sampling settings (as `answer_question` uses
    them via `GenerationSettings.from_model`), the toolkit's new-token limit, EOS and pad."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from .generation import GenerationSettings
    try:
        gc = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:  # no generation_config.json: transformers' defaults, as for the loaded model
        gc = GenerationConfig()
    s = GenerationSettings.from_model(SimpleNamespace(generation_config=gc))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {**{k: v for k, v in gc.to_diff_dict().items() if k != "transformers_version"},
           "do_sample": s.do_sample, "max_new_tokens": s.max_new_tokens,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    if tokenizer.bos_token_id is not None:
        out["bos_token_id"] = tokenizer.bos_token_id
    if s.do_sample:
        out.update(temperature=s.temperature, top_p=s.top_p)
    else:
        out.pop("temperature", None), out.pop("top_p", None)
    return out


def write_serving_files(folder: Path, tokenizer, system_prompt: str | None, model_dir=None, processor=None,
                        max_pixels: int | None = None) -> dict:
    """Chat template file + generation_config.json into `folder`. Without `model_dir`, `folder` is a
    merged model: its generation config is the starting point, and its tokenizer is re-saved with the
    served chat template and the response template (what `transformers serve` loads). `processor` (image
    models): saved too, resizing figures under the run's `max_pixels` exactly as `--image` does, so the
    engine (serve_engine.py registers its class) takes image parts."""
    import copy
    folder.mkdir(parents=True, exist_ok=True)
    tmpl = served_chat_template(tokenizer, system_prompt)
    gen = generation_defaults(model_dir or folder, tokenizer)
    if model_dir is None:
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = tmpl
        tok.response_template = response_template(tokenizer, tmpl)
        tok.save_pretrained(str(folder))
        if processor is not None:
            from ..format.media import processor_size
            processor = copy.deepcopy(processor)
            processor.tokenizer, processor.chat_template = tok, tmpl
            processor.image_processor.size = processor_size(processor.image_processor, max_pixels)
            processor.save_pretrained(str(folder))
    (folder / CHAT_TEMPLATE_FILE).write_text(tmpl, encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return gen


# ---------------------------------------------------------------------------------------------------
# the merge cache
# ---------------------------------------------------------------------------------------------------


def _hash_file(h, path: Path) -> None:
    h.update(path.name.encode() + b"\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def adapter_key(adapter_dir: Path, tok_dir: Path | None, base: str, system_prompt: str | None) -> str:
    """sha256 of what the merged folder is made of: adapter files, training tokenizer, run card, base."""
    from ..data.store import RUN_CARD
    h = hashlib.sha256(json.dumps([SERVE_FORMAT, str(base), system_prompt]).encode())
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    extra = [tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")] if tok_dir else []
    extra += [adapter_dir / RUN_CARD, adapter_dir.parent / RUN_CARD]
    for p in files + sorted({p for p in extra if p.is_file()} - set(files)):
        _hash_file(h, p)
    return h.hexdigest()


def run_name(adapter_dir: Path) -> str:
    """The model name clients send: the run folder's name (RUN for RUN/model and RUN/model/adapter)."""
    from ..data.store import ADAPTER_DIR
    from ..models.adapters import TRAIN_OUTPUT_DIR
    d = adapter_dir.resolve()
    if d.name == ADAPTER_DIR:
        d = d.parent   # the training output folder
    if d.name == TRAIN_OUTPUT_DIR:
        d = d.parent   # make demo's RUN/model: the run folder names it
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in d.name).strip(".-") or "model"
    return name


@dataclass
class Prepared:
    name: str            # the model name clients send
    model_dir: Path      # the merged folder (transformers) / the adapter folder (vLLM)
    workdir: Path        # where the engine runs (the merged folder is `name` inside it)
    base: str
    reused: bool


def _run_facts(adapter: str, model: str | None, name: str | None):
    """(base, training tokenizer, adapter dir, run-card system prompt, served name, cache key)."""
    from ..models import adapters as inference
    base, tokenizer, adir, card = inference.base_and_tokenizer(model, adapter)
    system_prompt = inference.card_system_prompt(card)
    key = adapter_key(adir, inference.training_files(adir)[0], base, system_prompt)
    return base, tokenizer, adir, system_prompt, name or run_name(adir), key


def _serving_processor(base: str, adir: Path):
    """(processor, the run's max_pixels) of an image model; (None, None) for a text model."""
    from ..format.media import card_max_pixels
    from ..models import adapters as inference
    from ..models.kind import is_vision_model
    from ..models.loading import load_processor
    if not is_vision_model(base):
        return None, None
    tok_dir, card = inference.training_files(adir)
    return load_processor(str(tok_dir or base)), card_max_pixels(card)


def prepare_merged(adapter: str, model: str | None, cache_dir, name: str | None = None, log=print) -> Prepared:
    """Merge base + adapter into `cache_dir/<key>/<name>` once; reuse it while the key is unchanged."""
    from ..models import adapters as inference
    base, tokenizer, adir, system_prompt, name, key = _run_facts(adapter, model, name)
    entry = Path(cache_dir).expanduser() / key[:16]
    out = entry / name
    if (out / KEY_FILE).is_file() and (out / "config.json").is_file():
        log(f"reusing the merged model in {out} (adapter unchanged)")
        return Prepared(name, out, entry, base, True)
    if out.exists():
        raise InputError(f"cache folder '{out}' exists but is no complete --serve merge; remove it")
    log(f"merging {adir} into {base} once for serving (cached in {out})")
    with atomic_dir(out) as tmp:
        # its "written to" line would name the temporary folder
        inference.merge_and_save(adapter, tmp / "m", model=model, overwrite=True,
                                 log=lambda m: None if m.startswith("merged model written") else log(m))
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()
        processor, max_pixels = _serving_processor(base, adir)
        write_serving_files(tmp, tokenizer, system_prompt, processor=processor, max_pixels=max_pixels)
        (tmp / KEY_FILE).write_text(json.dumps({"key": key, "adapter": str(adir.resolve()), "base": base,
                                                "format": SERVE_FORMAT}, indent=2))
    return Prepared(name, out, entry, base, False)


def prepare_vllm(adapter: str, model: str | None, cache_dir, name: str | None = None, log=print) -> Prepared:
    """No merge: vLLM applies the LoRA itself. Writes the chat template and generation config folder."""
    from ..models.loading import resolve_name
    base, tokenizer, adir, system_prompt, name, key = _run_facts(adapter, model, name)
    from ..models.kind import is_vision_model
    if is_vision_model(base):
        raise InputError("--engine vllm cannot serve this image model's adapter (vLLM's LoRA takes no trained "
                         "vision merger, so figures would be read by the untrained one); serve it with "
                         "--engine transformers")
    # vLLM runs in `entry`: every path it gets is absolute
    entry = Path(cache_dir).expanduser().resolve() / f"vllm-{key[:16]}"
    base = resolve_name(base)
    base = str(Path(base).resolve()) if Path(base).exists() else base
    with atomic_dir(entry) as tmp:
        write_serving_files(tmp, tokenizer, system_prompt, model_dir=base)
    return Prepared(name, adir.resolve(), entry, base, False)


# ---------------------------------------------------------------------------------------------------
# engine command lines
# ---------------------------------------------------------------------------------------------------


def transformers_command(prep: Prepared, host: str, port: int, quantization: str, device: str = "auto",
                         max_request_bytes: int | None = None, max_prompt_tokens: int | None = None) -> list[str]:
    """`transformers serve` through serve_engine.py (image processor registered, request guard, clipping)."""
    guard = ["--max_request_bytes", str(max_request_bytes or DEFAULT_MAX_REQUEST_BYTES)]
    if max_prompt_tokens:
        guard += ["--max_prompt_tokens", str(max_prompt_tokens)]
    cmd = [sys.executable, "-m", "pmcvqa_sft.infer.serve_engine", *guard, "--", prep.name,
           "--host", host, "--port", str(port), "--device", device, "--dtype", "auto", "--log-level", "warning"]
    if quantization in ("8bit", "4bit"):
        cmd += ["--quantization", f"bnb-{quantization}"]
    return cmd


def _lora_rank(adapter_dir: Path) -> int:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r = int(cfg.get("r") or 16)
    ranks = [int(x) for x in (cfg.get("rank_pattern") or {}).values()] + [r]
    need = max(ranks)
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= need) if need <= 512 else need


def vllm_command(prep: Prepared, host: str, port: int) -> list[str]:
    """`vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER` with the run's template and settings."""
    from ..models import adapters as inference
    tok_dir, _ = inference.training_files(prep.model_dir)
    cmd = ["vllm", "serve", prep.base, "--host", host, "--port", str(port),
           "--enable-lora", "--lora-modules", f"{prep.name}={prep.model_dir}",
           "--max-lora-rank", str(_lora_rank(prep.model_dir)),
           "--chat-template", str(prep.workdir / CHAT_TEMPLATE_FILE),
           "--generation-config", str(prep.workdir)]
    if tok_dir is not None:
        cmd += ["--tokenizer", str(tok_dir.resolve())]
    if (prep.workdir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8").find(prompts.THINK_OPEN.strip()) >= 0:
        cmd += ["--reasoning-parser", "deepseek_r1"]
    return cmd


# ---------------------------------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------------------------------


def url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def wait_ready(proc: subprocess.Popen, base_url: str, timeout: float, poll: float = 0.5) -> None:
    """Poll `<base_url>/models` until it answers 200; one-line error when the engine dies or times out."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise InputError(f"the engine exited with code {code} before it was ready (its output is above)")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise InputError(f"the engine did not answer {base_url}/models within {timeout:.0f} s "
                             f"(raise --ready_timeout for a slow disk or a large model)")
        time.sleep(poll)


def usage_lines(base_url: str, name: str) -> list[str]:
    q = prompts.format_user_prompt("Which organ produces bile?", {"A": "Kidney", "B": "Spleen", "C": "Liver",
                                                                  "D": "Heart"})
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": q}], "temperature": 0,
                       "max_tokens": 256})
    return [
        f"curl -s {base_url}/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
        "python -c \"from openai import OpenAI; c = OpenAI(base_url='" + base_url + "', api_key='none'); "
        "r = c.chat.completions.create(model='" + name + "', messages=[{'role': 'user', 'content': "
        + repr(q).replace('"', '\\"') + "}], temperature=0, max_tokens=256); print(r.choices[0].message.content)\"",
    ]


def _kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the engine's whole process group (it runs in its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """SIGTERM (uvicorn and vLLM shut down cleanly on it), SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        _kill(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
    return proc.returncode


def run_engine(cmd: list[str], cwd: Path, host: str, port: int, name: str, engine: str,
               ready_timeout: float = DEFAULT_READY_TIMEOUT, env: dict | None = None, log=print) -> int:
    """Start the engine, wait until it answers, print how to call it, forward Ctrl-C/SIGTERM, wait."""
    if host not in LOCAL_HOSTS:
        log(f"WARNING: binding to {host}: anyone who can reach this machine on port {port} can use the model "
            f"(the engine has no authentication); keep it on 127.0.0.1 or put it behind an authenticating proxy")
    else:
        log(f"binding to {host} only (this machine); pass --host to change it, see docs/SERVING.md first")
    log("starting: " + " ".join(shlex.quote(c) for c in cmd))
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, start_new_session=True)
    stop = {"sig": None}

    def forward(signum, _frame):
        stop["sig"] = signum
        raise KeyboardInterrupt

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    base_url = f"http://{url_host(host)}:{port}/v1"
    try:
        wait_ready(proc, base_url, ready_timeout)
        print(f"ready: {base_url} (model '{name}', engine {engine}; Ctrl-C stops it)", flush=True)
        for line in usage_lines(base_url, name):
            print(line, flush=True)
        code = proc.wait()
        if stop["sig"] is None:
            raise InputError(f"the engine stopped by itself with code {code} (its output is above)")
        return 0
    except KeyboardInterrupt:
        log("stopping the engine ... (Ctrl-C again kills it)")
        for s in old:
            signal.signal(s, lambda *_: _kill(proc))
        _stop(proc)
        log("engine stopped")
        return 0
    except BaseException:
        _stop(proc, grace=10.0)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def serve(adapter: str, model: str | None = None, engine: str = "transformers", host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, quantization: str | None = None, cache_dir=None, name: str | None = None,
          ready_timeout: float = DEFAULT_READY_TIMEOUT, max_request_bytes: int | None = None,
          max_prompt_tokens: int | None = None, log=print) -> int:
    """The whole --serve job. Returns the exit code (0 after a clean stop)."""
    check_serve_args(engine, host, port, ready_timeout, max_request_bytes, max_prompt_tokens)
    check_port_free(host, port)
    cache_dir = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()).resolve()
    if engine == "vllm":
        if max_request_bytes or max_prompt_tokens:
            raise InputError("--max_request_bytes / --max_prompt_tokens apply to --engine transformers; vLLM has "
                             "its own limits (--max-model-len), see docs/SERVING.md")
        if quantization not in (None, "none"):
            raise InputError("--engine vllm serves the base in its stored dtype; drop --quantization "
                             "(or use --engine transformers for 8-bit/4-bit)")
        prep = prepare_vllm(adapter, model, cache_dir, name, log=log)
        return run_engine(vllm_command(prep, host, port), prep.workdir, host, port, prep.name, engine,
                          ready_timeout, log=log)
    from ..models.adapters import default_quantization
    quantization = quantization or default_quantization()
    prep = prepare_merged(adapter, model, cache_dir, name, log=log)
    # Everything is local: keep the engine off the network (and quiet about telemetry).
    # The engine runs in the cache entry: it imports serve_engine from this checkout.
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
    cmd = transformers_command(prep, host, port, quantization, max_request_bytes=max_request_bytes,
                               max_prompt_tokens=max_prompt_tokens)
    return run_engine(cmd, prep.workdir, host, port, prep.name, "transformers serve", ready_timeout, env=env, log=log)
