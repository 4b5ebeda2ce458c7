"""The `transformers serve` process that `--serve` starts: the stock engine, plus what the toolkit needs.

    python -m pmcvqa_sft.infer.serve_engine [--max_request_bytes N] [--max_prompt_tokens N] -- MODEL [serve options]

Nothing here is a server of its own: `transformers serve` (its FastAPI app, uvicorn, its model process)
runs unchanged, with three additions, all made before it starts:
- image models: `ImageTextProcessor` (models/processor.py, no torchvision needed) is registered with
  `AutoProcessor`, so the merged folder's processor_config.json loads as an image processor and the
  engine treats the model as multimodal (without it, AutoProcessor falls back to the tokenizer and the
  engine silently drops image parts);
- one plain ASGI middleware on the engine's own app (`RequestGuard`): a body over `max_request_bytes`
  is refused with 413 before it is parsed (read and dropped), and only the chat and listing routes are reachable (the admin
  routes `/load_model` and `/reset`, raw `/v1/completions` (no chat template: off the trained prompt)
  and the others answer 404);
- `GuardedChatHandler`, the stock chat handler with checks first: a malformed body is a 400 with a
  message (never a 500), images must be base64 `data:` URLs of figures `figures.check_image_bytes`
  (a DICOM object, `data:application/dicom;base64,...`, is shown as `--image x.dcm` shows it and handed on
  to the engine as PNG)
  accepts (the checks of --image, the console and preprocessing), a text longer than `max_prompt_tokens`
  could be is refused before it is tokenized, and `max_tokens` is clipped to the room left in the model's
  context (`finish_reason` is then "length", honestly).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import sys

from transformers import AutoProcessor
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.utils import Modality, prompt_length
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig

from ..data.dicom import is_dicom, read_dicom
from ..models.processor import ImageTextProcessor
from .serving import DEFAULT_MAX_REQUEST_BYTES

# At import, so that the model's process (started with multiprocessing "spawn", which re-imports this
# module as __mp_main__) loads the processor too.
AutoProcessor.register(Qwen2_5_VLConfig, ImageTextProcessor, exist_ok=True)

DRAIN_FACTOR = 4
ALLOWED_ROUTES = {("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("OPTIONS", "/v1/models"),
                  ("GET", "/health")}
ROLES = ("system", "user", "assistant")
LIMITS = {"max_request_bytes": DEFAULT_MAX_REQUEST_BYTES, "max_prompt_tokens": None}


def _json_response(status: int, message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"detail": message, "error": {"message": message, "type": "invalid_request_error"}},
                        status_code=status)


class RequestGuard:
    """Plain ASGI middleware (outermost): route allow-list, then the body read up to `max_bytes` (413 past it,
    before anything parses or tokenizes it) and handed on to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (scope["method"], scope["path"].rstrip("/") or "/") not in ALLOWED_ROUTES:
            return await _json_response(404, f"{scope['method']} {scope['path']} is not served here "
                                             f"(only POST /v1/chat/completions, GET /v1/models, GET /health)")(
                scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = _json_response(413, f"request body over the server's limit of {self.max_bytes} bytes "
                                      f"(--max_request_bytes)")
        length = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        chunks, size, over = [], 0, declared is not None and declared > self.max_bytes
        # A body over the limit is read on and dropped (kept: nothing, parsed: nothing), so that the client,
        # still sending, gets the 413 rather than a broken pipe; past DRAIN_FACTOR times the limit the
        # connection is just answered and closed.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            over = over or size > self.max_bytes
            if not over:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False) or size > DRAIN_FACTOR * self.max_bytes:
                break
        if over:
            return await too_big(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the disconnect, for CancelOnDisconnect

        return await self.app(scope, replay, send)


class BadRequest(ValueError):
    """The client's fault: the engine's own ValueError handler answers it with 400 and the message."""


def _int_field(body, name, low=1):
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
        raise BadRequest(f"'{name}' must be an integer >= {low}, got {json.dumps(v)[:40]}")


def _number_field(body, name, low, high, low_open=False):
    v = body.get(name)
    if v is None:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v <= high
    ok = ok and (v > low if low_open else v >= low)
    if not ok:
        raise BadRequest(f"'{name}' must be a number in {'(' if low_open else '['}{low}, {high}], "
                         f"got {json.dumps(v)[:40]}")


def image_url_of(part) -> str:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise BadRequest("an image_url part needs {'image_url': {'url': 'data:image/...;base64,...'}}")
    return url


def check_chat_body(body: dict) -> None:
    """Shape and value checks of a chat completion body: BadRequest with a message naming the field."""
    if "generation_config" in body:
        raise BadRequest("'generation_config' is not accepted by this server; use max_tokens, temperature, top_p")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is missing: a list of {'role': ..., 'content': ...} objects")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"'messages' must be a non-empty list of {{'role', 'content'}} objects, "
                         f"got {type(messages).__name__}{' (empty)' if messages == [] else ''}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))[:40]}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content[{j}].text must be a string")
            elif kind == "image_url":
                if not image_url_of(part).startswith("data:"):
                    raise BadRequest(f"messages[{i}].content[{j}]: only base64 data: URLs are taken "
                                     f"(data:image/png;base64,...); this server fetches no URL or file")
            else:
                raise BadRequest(f"messages[{i}].content[{j}] must be a {{'type': 'text'|'image_url', ...}} "
                                 f"object, got {json.dumps(part)[:60]}")
    for name in ("max_tokens", "max_completion_tokens"):
        _int_field(body, name)
    _int_field(body, "seed", low=0)
    _number_field(body, "temperature", 0, 2)
    _number_field(body, "top_p", 0, 1, low_open=True)
    if "stream" in body and not isinstance(body["stream"], (bool, type(None))):
        raise BadRequest("'stream' must be true or false")


def check_images(body: dict) -> None:
    """Every image part decodes to a usable figure (figures.check_image_bytes: size, pixels, aspect ratio)."""
    from ..data import figures
    for i, m in enumerate(body["messages"]):
        for j, part in enumerate(m["content"] if isinstance(m["content"], list) else []):
            if part["type"] != "image_url":
                continue
            url = image_url_of(part)
            head, _, data = url.partition(",")
            where = f"messages[{i}].content[{j}]"
            if not head.endswith(";base64"):
                raise BadRequest(f"{where}: the data URL must be base64 (data:image/png;base64,...)")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"{where}: the data URL is not valid base64") from None
            try:
                figures.check_image_bytes(raw, where)
            except figures.FigureSkip as exc:
                raise BadRequest(f"the figure cannot be used ({exc})") from None
            if is_dicom(raw):  # the engine decodes images with PIL: hand it the DICOM as a viewer shows it
                _replace_url(part, dicom_data_url(raw, where))


def dicom_data_url(raw: bytes, where: str) -> str:
    """A DICOM object (modality LUT, stored or percentile window, MONOCHROME1 inverted, middle frame:
    data/dicom.py, as `--image x.dcm` shows it) as a PNG data URL."""
    im, _ = read_dicom(raw, name=where)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _replace_url(part: dict, url: str) -> None:
    if isinstance(part.get("image_url"), dict):
        part["image_url"]["url"] = url
    else:
        part["image_url"] = url


def text_chars(body: dict) -> int:
    n = 0
    for m in body["messages"]:
        c = m["content"]
        n += len(c) if isinstance(c, str) else sum(len(p["text"]) for p in c if p["type"] == "text")
    return n


_TOKEN_CHARS: dict = {}


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for (the longest vocabulary entry), so that
    `chars / longest` is a lower bound on a text's token count, known without tokenizing it."""
    key = id(tokenizer)
    if key not in _TOKEN_CHARS:
        _TOKEN_CHARS[key] = max(len(t) for t in tokenizer.get_vocab())
    return _TOKEN_CHARS[key]


class GuardedChatHandler(ChatCompletionHandler):
    """The stock chat handler (same steps, same order as its `handle_request`) with the checks above."""

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)
        check_chat_body(body)

    async def handle_request(self, body: dict, request_id: str):
        self._validate_request(body)
        engine = self.model_manager.get_engine(body.get("model"))
        has_image = any(isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"])
                        for m in body["messages"])
        if has_image and engine.modality == Modality.LLM:
            raise BadRequest("this model takes no images (a text model); send text parts only")
        context = self.generation_state.context_length(engine.model_config)
        limit = LIMITS["max_prompt_tokens"] or (context - 1 if context else None)
        if limit is not None:
            tokenizer = getattr(engine.processor, "tokenizer", engine.processor)
            least = text_chars(body) // longest_token_chars(tokenizer)
            if least > limit:  # refused before the (slow, memory-hungry) chat template and tokenizer run
                raise BadRequest(f"the prompt is over {limit} tokens (its text alone is at least {least}); "
                                 f"this server takes at most {limit} prompt tokens")
        if has_image:
            await asyncio.to_thread(check_images, body)
        inputs = await self.run_in_thread(self.render_messages, engine, body["messages"], body)
        generation_kwargs = self._build_generation_kwargs(body, engine.generation_config)
        self._check_prompt_length(engine, inputs)
        length = prompt_length(inputs)
        if limit is not None and length > limit:
            raise BadRequest(f"the prompt has {length} tokens; this server takes at most {limit}")
        if context is not None:  # never past the model's context: the answer would be garbage
            generation_kwargs["max_new_tokens"] = min(int(generation_kwargs["max_new_tokens"]), context - length)
        streaming = body.get("stream")
        self._log_request(request_id, engine, inputs, generation_kwargs, streaming, body)
        if streaming:
            return self._streaming(request_id, engine, inputs, generation_kwargs, body.get("tools"),
                                   body.get("stream_options"))
        return await self._non_streaming(request_id, engine, inputs, generation_kwargs, tools=body.get("tools"))


def install(max_request_bytes: int, max_prompt_tokens: int | None) -> None:
    """Hook the guard into `transformers serve` (before `Serve` builds its app)."""
    from transformers.cli.serving import chat_completion, server

    LIMITS.update(max_request_bytes=max_request_bytes, max_prompt_tokens=max_prompt_tokens)
    chat_completion.ChatCompletionHandler = GuardedChatHandler  # `Serve.run` imports it by name when it runs
    build = server.build_server

    def build_guarded(*args, **kwargs):
        app = build(*args, **kwargs)
        app.add_middleware(RequestGuard, max_bytes=max_request_bytes)  # added last: runs first
        return app

    server.build_server = build_guarded


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else 0
    ours, rest = argv[:cut], argv[cut + 1:] if cut else argv
    p = argparse.ArgumentParser(prog="python -m pmcvqa_sft.infer.serve_engine")
    p.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--max_prompt_tokens", type=int, default=None)
    a = p.parse_args(ours)
    install(a.max_request_bytes, a.max_prompt_tokens)
    from transformers.cli.transformers import app
    sys.argv = ["transformers", "serve", *rest]
    app()


if __name__ == "__main__":
    main()
