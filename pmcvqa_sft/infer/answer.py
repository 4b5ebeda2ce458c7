"""Asking the model one question: the prompt, generation, and the reply parsed into letter and text.

`answer_question(question, choices, model, ...)` is the one entry point, text or image: with `image`
(a path or PIL image) the prompt is the model's chat template with its image placeholder
(`prompts.create_conversation(..., image=True)` puts `{"type": "image"}` before the question text, exactly
as preprocessing built the training rows), expanded to the figure's token count under the same
`max_pixels` as in training (the run card's value unless overridden); `generate` then gets pixel_values,
image_grid_thw and mm_token_type_ids with the left-padded ids (`data.collate.build_batch`). Without an
image the prompt is the rendered text conversation. Either way the inference prompt equals the training
prompt token for token (tested).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import os
import time
from typing import Mapping, Sequence

from .. import prompts
from ..core.errors import InputError
from ..data.collate import build_batch
from ..data.figures import open_image
from ..format.answers import answer_text_after_letter, extract_answer
from ..format.encoding import assistant_turn, render_prompt
from ..format.media import card_max_pixels, image_token_id, is_vision_processor, wants_mm_token_type_ids
from ..models.adapters import load_for_inference
from .generation import GenerationSettings, generate_batch


@dataclass
class Answer:
    letter: str | None      # the chosen letter (None: open question or unparseable)
    answer: str             # the answer text (choice text, or the open answer)
    reasoning: str          # the think block's content
    raw: str                # the whole generated assistant turn
    n_tokens: int = 0
    seconds: float = 0.0
    finished: bool = True   # False: cut at max_new_tokens (or the model's context) before the end
    text_letter: str | None = None  # the choice the written text names, where it is not `letter`'s

    def to_dict(self) -> dict:
        return asdict(self)


_CACHE: dict = {}


def _resolve_model(model, tokenizer, adapter, quantization):
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("pass tokenizer= together with a loaded model")
        return model, tokenizer, prompts.SYSTEM_PROMPT, {}
    key = (str(model) if model else None, str(adapter) if adapter else None, quantization)
    if key not in _CACHE:
        if key[0] is None and key[1] is None:
            raise ValueError("answer_question needs model= (a loaded model, a name or a folder) or adapter=")
        _CACHE[key] = load_for_inference(key[0], key[1], quantization, log=lambda *_: None)
    loaded = _CACHE[key]
    return loaded.model, tokenizer or loaded.processor or loaded.tokenizer, loaded.system_prompt, loaded.card


def normalize_choices(choices) -> dict[str, str] | None:
    if choices is None or isinstance(choices, Mapping):
        return dict(choices) if choices else None
    try:
        return prompts.split_choices_arg(list(choices))
    except ValueError as exc:
        raise InputError(f"--choices: {exc}") from None


def build_messages(question: str, choices: Mapping[str, str] | None, caption: str | None = None,
                   system_prompt: str | None = prompts.SYSTEM_PROMPT, image: bool = False) -> list[dict]:
    """The inference conversation (image=True: the user turn starts with the image item)."""
    return prompts.create_conversation(question, choices or {}, caption=caption, system_prompt=system_prompt,
                                       image=image)


def parse_reply(raw: str, choices: Mapping[str, str] | None) -> tuple[str | None, str, str, str | None]:
    """(letter, answer text, reasoning, text_letter) of a generated assistant turn; text_letter is the
    choice the written text names where it disagrees with the letter (`Answer: D. Liver`, Liver = C)."""
    ext = extract_answer(raw, choices or {"A": "", "B": "", "C": "", "D": ""})
    if not choices:
        return None, ext.answer_text, ext.reasoning, None
    if ext.conflict:  # `Answer: D. Ultrasound` with Ultrasound = A: show what was written, not choice D's text
        return ext.letter, ext.stated_text, ext.reasoning, ext.text_letter
    text = answer_text_after_letter(ext.answer_text, ext.letter, choices) if ext.letter else ext.answer_text
    return ext.letter, text, ext.reasoning, None


def conflict_note(ans: Answer, choices: Mapping[str, str] | None) -> str | None:
    """A line saying the answer's letter and text name different choices, else None."""
    if not ans.text_letter or not choices:
        return None
    return (f"the model wrote letter {ans.letter} ({choices.get(ans.letter, '?')}) but choice {ans.text_letter}'s "
            f"text ('{ans.answer}'); the evaluation counts such an answer wrong (letter and text must agree)")


def answer_question(question: str, choices: Mapping[str, str] | Sequence[str] | None = None, model=None,
                    tokenizer=None, *, adapter: str | None = None, caption: str | None = None,
                    system_prompt: str | None = None, greedy: bool = False, temperature: float | None = None,
                    top_p: float | None = None, max_new_tokens: int | None = None,
                    quantization: str | None = None, image=None, max_pixels: int | None = None) -> Answer:
    """Ask one question. `model` is a loaded model (with `tokenizer`) or a name/folder; `adapter` a
    training output folder. `choices`: {"A": "MRI", ...} or ["MRI", "CT", ...]. Sampling follows the
    model's generation_config unless `greedy` / `temperature` / `top_p` say otherwise.
    `image` (a path or PIL image): the figure, for an image-text model (`tokenizer` = its processor
    when `model` is a loaded one); `max_pixels` its pixel cap (default: the training run's)."""
    net, tok, card_prompt, card = _resolve_model(model, tokenizer, adapter, quantization)
    choices = normalize_choices(choices)
    settings = GenerationSettings.from_model(net, temperature, top_p, max_new_tokens, greedy)
    if image is None and is_vision_processor(tok):
        tok = tok.tokenizer  # a text-only question to an image model
    if image is not None and not is_vision_processor(tok):
        raise InputError("an image question needs an image-text model (e.g. --model tiny-vision or "
                         "Qwen/Qwen2.5-VL-7B-Instruct) and its processor")
    return ask(net, tok, question, choices, settings, image=image, caption=caption,
               system_prompt=system_prompt or card_prompt, max_pixels=max_pixels or card_max_pixels(card))


def ask(model, tok, question: str, choices, settings, *, image=None, caption=None, system_prompt=None,
        max_pixels=None) -> Answer:
    """One question (about one figure when `image` is given; `tok` is then the processor) -> Answer."""
    if image is None:
        messages = build_messages(question, choices, caption, system_prompt)
        prompt, inputs, tokenizer = render_prompt(tok, messages), None, tok
    else:
        img = open_image(image) if isinstance(image, (str, os.PathLike)) else image
        messages = build_messages(question, choices, caption, system_prompt, image=True)
        prompt, inputs = conversation_inputs(model, tok, messages, [img], max_pixels)
        tokenizer = tok.tokenizer
    start = time.perf_counter()
    gen = generate_batch(model, tokenizer, [prompt], settings, inputs=inputs)[0]
    raw = assistant_turn(prompt, gen.text)
    letter, text, reasoning, text_letter = parse_reply(raw, choices)
    return Answer(letter, text, reasoning, raw, len(gen.token_ids), time.perf_counter() - start, gen.finished,
                  text_letter)


def model_inputs(processor, prompt_ids: Sequence[Sequence[int]], images: Sequence[Sequence], max_pixels,
                 mm_token_type_ids: bool = True) -> dict:
    """Left-padded generation inputs: rows of prompt ids (one placeholder per figure) + their figures."""
    flat = [img for row in images for img in row]
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None \
        else processor.tokenizer.eos_token_id
    batch = build_batch([(ids, None) for ids in prompt_ids], flat, processor.image_processor,
                        image_token_id(processor), pad, max_pixels, mm_token_type_ids, left=True)
    batch.pop("labels", None)
    return batch


def conversation_inputs(model, processor, messages: list[dict], images: Sequence, max_pixels) -> tuple[str, dict]:
    """(rendered prompt, model inputs) of a conversation whose image items are `images`, in order."""
    text = render_prompt(processor.tokenizer, messages)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, model_inputs(processor, [ids], [list(images)], max_pixels, wants_mm_token_type_ids(model))
