"""Any OpenAI-compatible chat endpoint as a teacher (rejection-sampled rationales) or as the model
under evaluation (`--evaluate --method generate --endpoint URL --endpoint_model NAME`).

The messages are the ones prompts.py builds for training and local inference (no system message by
default, the instruction in the user turn); image questions send the figure as an OpenAI image content
part (a PNG data URL). The answer is read by metrics.generated_prediction, as for local generation.
The API key comes from PMCVQA_ENDPOINT_KEY or OPENAI_API_KEY (never printed; "EMPTY" when unset, which
local servers accept). Errors and timeouts are retried with exponential backoff, then reported by name.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .. import prompts
from ..core.errors import InputError
from ..format.answers import reasoning_tokens
from .metrics import compute_metrics, generated_prediction
from .rationales import EndpointFailure, JsonlLog, Sample

KEY_VARIABLES = ("PMCVQA_ENDPOINT_KEY", "OPENAI_API_KEY")
INSTALL_HINT = "the endpoint client needs the openai package: pip install 'openai>=1.40,<3'"


def make_client(url: str, timeout: float = 600.0):
    try:
        import openai
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    key = next((os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), "EMPTY")
    return openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0)


def figure_data_url(image) -> str:
    """A PIL image -> `data:image/png;base64,...`."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def row_messages(row, include_caption: bool, system_prompt=None, image=None) -> list[dict]:
    """The prompt messages of one evaluation row, the figure as an image_url part when given."""
    cap = row.get("caption") if include_caption else None
    msgs = prompts.create_conversation(row["question"], row["choices"], caption=cap or None,
                                       system_prompt=system_prompt, image=image is not None)
    if image is not None:
        msgs[-1]["content"] = [{"type": "image_url", "image_url": {"url": figure_data_url(image)}}
                               if item.get("type") == "image" else item for item in msgs[-1]["content"]]
    return msgs


def turn_text(message) -> str:
    """The whole assistant turn: a separate `reasoning_content` (DeepSeek API, vLLM's reasoning parser)
    goes back into the think block; a reply that closes a think block it did not open (the prompt
    opened it) gets the `<think>\\n` back, as `encoding.assistant_turn` does for local generation."""
    content = message.content or ""
    reasoning = getattr(message, "reasoning_content", None)
    if reasoning:
        return f"{prompts.THINK_OPEN}{reasoning}\n{prompts.THINK_CLOSE}\n\n{content}"
    if prompts.THINK_CLOSE in content and not content.lstrip().startswith("<think>"):
        return prompts.THINK_OPEN + content
    return content


def chat(client, model: str, messages, temperature: float, top_p: float, max_tokens: int,
         retries: int = 4, backoff: float = 1.0) -> Sample:
    """One completion, retried with exponential backoff; EndpointFailure(name) after the last try."""
    import openai
    last = "error"
    for attempt in range(retries + 1):
        try:
            r = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                               top_p=top_p, max_tokens=max_tokens)
            choice = r.choices[0]
            n = getattr(r.usage, "completion_tokens", None) or 0
            raw = turn_text(choice.message)
            return Sample(raw, range(n), choice.finish_reason == "stop", choice.message.content or "")
        except openai.APITimeoutError:
            last = "timeout"
        except openai.APIConnectionError:
            last = "connection"
        except openai.APIStatusError as e:
            last = f"http_{e.status_code}"
            if 400 <= e.status_code < 500 and e.status_code not in (408, 409, 429):
                break  # a bad request stays bad
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise EndpointFailure(last)


def endpoint_sampler(client, model, k, temperature, top_p, max_tokens, include_caption, load_image=None,
                     retries=4, backoff=1.0, system_prompt=None):
    """Up to K samples of one question, one request each, stopping when the caller stops asking."""
    def sample(row):
        msgs = row_messages(row, include_caption, system_prompt, _figure(row, load_image))
        for _ in range(k):
            yield chat(client, model, msgs, temperature, top_p, max_tokens, retries, backoff)
    return sample


def evaluate_endpoint(client, model, rows, out_dir, include_caption, max_tokens, concurrency=8,
                      temperature=0.0, top_p=1.0, load_image=None, retries=4, backoff=1.0,
                      system_prompt=None, name="endpoint", tokenizer=None, tokenizer_name=None) -> dict:
    """Score the endpoint on `rows` (greedy by default); `tokenizer` (named `tokenizer_name`) counts the
    reasoning tokens as a local evaluation does (format.answers.reasoning_tokens), else they are not
    counted. Each answer is appended (fsync) to `out_dir/endpoint_progress.jsonl` and reused on a rerun;
    a request that failed after its retries is not written, so the rerun asks again. Then
    predictions.jsonl + metrics.json (the `--compare_runs` format, model name `name`) are written
    atomically from all answers."""
    from pathlib import Path
    from ..core.atomic import write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "endpoint_progress.jsonl")
    todo = [r for r in rows if _row_id(r) not in log.done]
    t0 = time.perf_counter()

    def one(row):
        msgs = row_messages(row, include_caption, system_prompt, _figure(row, load_image))
        try:
            s = chat(client, model, msgs, temperature, top_p, max_tokens, retries, backoff)
        except EndpointFailure as e:
            return {"id": _row_id(row), "failure": e.name}
        why = reasoning_tokens(tokenizer, s.raw) if tokenizer is not None else None
        return {"id": _row_id(row), "failure": None, **generated_prediction(s.raw, row["choices"], s, 0, why)}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for rec in pool.map(one, todo):
            if rec["failure"] is None:
                log.append(rec)
    failures = {}
    preds = []
    for r in rows:
        p = log.done.get(_row_id(r))
        if p is None:  # counted wrong and unparsed, named in metrics.json
            failures[_row_id(r)] = "failed after retries"
            p = generated_prediction("", r["choices"], Sample("", [], False), 0)
        preds.append(p)
    m = compute_metrics(rows, preds, time.perf_counter() - t0, "generate", max_tokens)
    m.update(endpoint_model=model, endpoint_failures=len(failures), temperature=temperature,
             concurrency=concurrency, reasoning_tokens_counted_with=tokenizer_name if tokenizer is not None else None)
    tmp = out / "predictions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r, p in zip(rows, preds):
            f.write(json.dumps({"source_file": r.get("source_file"), "source_row": r.get("source_row"),
                                "question": r["question"], "gold": r["answer_label"], name: p},
                               ensure_ascii=False) + "\n")
    os.replace(tmp, out / "predictions.jsonl")
    write_json(out / "metrics.json", {name: m})
    return m


def _figure(row, load_image):
    """The row's figure (PIL) when it has one and a loader is given, else None (a text question)."""
    return load_image(row["image"]) if load_image and row.get("image") else None


def _row_id(row) -> str:
    return f"{row.get('source_file')}:{row.get('source_row')}:{row['index']}"
