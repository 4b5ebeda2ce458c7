"""Text generation: settings from the model's generation_config, batched left-padded generation, streaming.

- Defaults come from the model's own `generation_config` (DeepSeek's: do_sample, temperature 0.6,
  top_p 0.95); `GenerationSettings.from_model(model, temperature=..., greedy=...)` applies CLI overrides.
- `generate_batch` pads on the LEFT (every prompt then ends at the same position, so the first new
  token of every row is predicted from its real last prompt token) and tokenizes each rendered prompt
  with `add_special_tokens=False` (the template already wrote BOS). Greedy batched output equals
  unbatched output token for token (tested).
- `stream_generate` yields text pieces as they are produced (TextIteratorStreamer + a thread).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import threading
from typing import Iterator, Sequence

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class GenerationSettings:
    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def from_model(cls, model, temperature: float | None = None, top_p: float | None = None,
                   max_new_tokens: int | None = None, greedy: bool = False) -> "GenerationSettings":
        """The model's generation_config, overridden by whatever flag was given."""
        check_sampling(temperature, top_p)
        gc = getattr(model, "generation_config", None)
        s = cls(do_sample=bool(getattr(gc, "do_sample", False)),
                temperature=float(getattr(gc, "temperature", None) or 1.0),
                top_p=float(getattr(gc, "top_p", None) or 1.0))
        if temperature is not None:
            s.temperature, s.do_sample = temperature, temperature > 0
        if top_p is not None:
            s.top_p = top_p
        if max_new_tokens is not None:
            s.max_new_tokens = max_new_tokens
        if greedy:
            s.do_sample = False
        return s

    def describe(self) -> str:
        how = f"sampling (temperature {self.temperature:g}, top_p {self.top_p:g})" if self.do_sample else "greedy"
        return f"{how}, up to {self.max_new_tokens} new tokens"


def check_sampling(temperature: float | None, top_p: float | None) -> None:
    """One-line errors for sampling values transformers would reject (or silently misuse) later."""
    from ..core.errors import InputError
    if temperature is not None and not temperature >= 0:  # `not >=` also catches nan
        raise InputError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {top_p}")


def context_length(model) -> int | None:
    """The model's context in tokens (an image model's language model's), if its config says."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def room_in_context(model, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens clipped so that prompt + answer fit the model's context (past it the answer is
    garbage; `--serve` gets the same clip in serve_engine.py). A prompt that fills the context is a
    one-line error."""
    from ..core.errors import InputError
    ctx = context_length(model)
    if ctx is None:
        return max_new_tokens
    if prompt_len >= ctx:
        raise InputError(f"the prompt has {prompt_len} tokens; the model takes at most {ctx}, prompt and answer")
    return min(max_new_tokens, ctx - prompt_len)


def _generation_config(model, tokenizer, settings: GenerationSettings, prompt_len: int = 0):
    """A copy of the model's GenerationConfig with our settings (greedy drops the sampling knobs,
    which transformers otherwise warns about); max_new_tokens clipped to the context left."""
    from transformers import GenerationConfig
    base = getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else GenerationConfig()
    gc.max_new_tokens = room_in_context(model, prompt_len, settings.max_new_tokens)
    gc.max_length = None
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.do_sample = settings.do_sample
    if settings.do_sample:
        gc.temperature, gc.top_p = settings.temperature, settings.top_p
    else:
        # Neutral values, not None: transformers 5 fills None from the model's config (0.6 / 0.95) and
        # then warns that sampling flags are set while sampling is off.
        gc.temperature, gc.top_p = 1.0, 1.0
    return gc


def _device(model):
    return next(model.parameters()).device


def left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask) tensors, padded on the left."""
    import torch
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r))
            mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class Generated:
    text: str            # decoded new tokens, special tokens dropped, EOS excluded
    token_ids: list[int]  # new tokens up to and including the first EOS
    finished: bool        # EOS reached (False = cut by max_new_tokens)


def generate_batch(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings,
                   inputs: dict | None = None) -> list[Generated]:
    """Generate for several rendered prompts at once (left-padded). `inputs`: the model inputs built
    already (image models: left-padded ids with expanded image tokens, pixel_values, ...) instead."""
    enc = None if inputs is not None else [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return generate_ids(model, tokenizer, enc, settings, inputs=inputs)


def generate_ids(model, tokenizer, enc: Sequence[Sequence[int]] | None, settings: GenerationSettings,
                 inputs: dict | None = None) -> list[Generated]:
    """Generate for several tokenized prompts at once (left-padded), or from prebuilt `inputs`."""
    import torch
    width = max(map(len, enc)) if inputs is None else inputs["input_ids"].shape[1]
    gc = _generation_config(model, tokenizer, settings, width)
    if inputs is None:
        ids, mask = left_pad(enc, gc.pad_token_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
    dev = _device(model)
    with torch.no_grad():
        out = model.generate(**{k: v.to(dev) for k, v in inputs.items()}, generation_config=gc)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    results = []
    for row in new:
        eos = tokenizer.eos_token_id
        finished = eos in row
        row = row[:row.index(eos) + 1] if finished else row
        text = tokenizer.decode([t for t in row if t != eos], skip_special_tokens=False)
        results.append(Generated(text, row, finished))
    return results


def _stop_when(event: threading.Event):
    """A StoppingCriteria that ends generation (every row) once `event` is set: Ctrl-C in the console
    stops the model itself, not only the printing."""
    import torch
    from transformers import StoppingCriteria

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopOnEvent()


def stream_generate(model, tokenizer, prompt: str, settings: GenerationSettings,
                    stats: dict | None = None, inputs: dict | None = None) -> Iterator[str]:
    """Yield decoded text pieces while generating; `stats` receives n_tokens, finished, interrupted and max_new_tokens (after the clip to the context).
    `inputs`: prebuilt model inputs of the one prompt (image models), as in `generate_batch`.

    Leaving the loop early (Ctrl-C while waiting for a piece, or `close()` on this generator after a
    Ctrl-C in the caller) stops `model.generate` at its next token and waits for it, so no generation
    keeps running in the background and the next question starts at once.
    """
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    if inputs is None:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gc = _generation_config(model, tokenizer, settings, inputs["input_ids"].shape[1])
    if stats is not None:
        stats["max_new_tokens"] = gc.max_new_tokens
    inputs = {k: v.to(_device(model)) for k, v in inputs.items()}
    ids = inputs["input_ids"]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)
    holder: dict = {}
    stop = threading.Event()

    def work():
        try:
            with torch.no_grad():
                holder["out"] = model.generate(**inputs, generation_config=gc, streamer=streamer,
                                               stopping_criteria=StoppingCriteriaList([_stop_when(stop)]))
        except BaseException as exc:  # surface errors of the worker thread in the caller
            holder["error"] = exc
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    eos_text = tokenizer.eos_token or ""
    try:
        for piece in streamer:
            if eos_text and eos_text in piece:
                piece = piece.replace(eos_text, "")
            if piece:
                yield piece
    finally:
        if thread.is_alive():
            stop.set()  # interrupted (KeyboardInterrupt or GeneratorExit): end generate() at the next token
        thread.join()
        if stats is not None and "out" in holder:
            new = holder["out"][0, ids.shape[1]:].tolist()
            finished = tokenizer.eos_token_id in new
            stats["n_tokens"] = new.index(tokenizer.eos_token_id) + 1 if finished else len(new)
            stats["finished"] = finished
            stats["interrupted"] = stop.is_set()
    if "error" in holder:
        raise holder["error"]
