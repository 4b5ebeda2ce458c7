"""Asking an image model about a figure: the prompt, the model inputs, generation, demo questions.

The prompt is the model's own chat template with its image placeholder: `prompts.create_conversation(
..., image=True)` puts `{"type": "image"}` before the question text, exactly as preprocessing built the
training rows, so the inference prompt equals the training prompt token for token (tested). The
placeholder is expanded to the figure's token count under the same `max_pixels` as in training (the
run card's value unless overridden), then `generate` gets pixel_values, image_grid_thw and
mm_token_type_ids with the left-padded ids (`vision_collate.build_batch`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

from . import prompts
from .errors import InputError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample_vision"


def card_max_pixels(card) -> int | None:
    """The `--max_pixels` the adapter was trained with (None: no run card, the processor's own)."""
    return ((card or {}).get("args") or {}).get("max_pixels")


def is_vision_processor(obj) -> bool:
    return obj is not None and hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def opens_think(tokenizer) -> bool:
    """Whether the model's generation prompt opens a think block (DeepSeek-R1: yes; Qwen2.5-VL: no)."""
    from .encoding import render_prompt
    return render_prompt(tokenizer, [{"role": "user", "content": "x"}]).endswith(prompts.THINK_OPEN)


def image_messages(question: str, choices: Mapping[str, str] | None, caption: str | None = None,
                   system_prompt: str | None = None) -> list[dict]:
    return prompts.create_conversation(question, choices or {}, caption=caption, system_prompt=system_prompt,
                                       image=True)


def open_image(path):
    """A figure given on the command line / in the console, as RGB (named one-line errors)."""
    from . import figures
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image '{path}' does not exist")
    try:
        return figures.load_figure(str(p.parent), p.name, "folder")
    except figures.FigureSkip as exc:
        raise InputError(f"image '{path}' cannot be used: {exc}") from None


def console_image(processor, path):
    """The figure of a console `/image PATH` (one-line errors: no image model, no such file)."""
    if processor is None:
        raise InputError("this model takes no images; start the console with an image model (e.g. --model "
                         "tiny-vision or an image model's --adapter)")
    if not path:
        raise InputError("usage: /image PATH")
    return open_image(path)


def model_inputs(processor, prompt_ids: Sequence[Sequence[int]], images: Sequence[Sequence], max_pixels,
                 mm_token_type_ids: bool = True) -> dict:
    """Left-padded generation inputs: rows of prompt ids (one placeholder per figure) + their figures."""
    from .vision_collate import build_batch
    from .vision_processor import image_token_id
    flat = [img for row in images for img in row]
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None \
        else processor.tokenizer.eos_token_id
    batch = build_batch([(ids, None) for ids in prompt_ids], flat, processor.image_processor,
                        image_token_id(processor), pad, max_pixels, mm_token_type_ids, left=True)
    batch.pop("labels", None)
    return batch


def conversation_inputs(model, processor, messages: list[dict], images: Sequence, max_pixels) -> tuple[str, dict]:
    """(rendered prompt, model inputs) of a conversation whose image items are `images`, in order."""
    from .encoding import render_prompt
    from .vision_model import wants_mm_token_type_ids
    text = render_prompt(processor.tokenizer, messages)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, model_inputs(processor, [ids], [list(images)], max_pixels, wants_mm_token_type_ids(model))


def answer_image_question(question: str, choices, model, processor, image, *, caption=None, system_prompt=None,
                          settings=None, max_pixels=None):
    """One question about one figure (`image`: a path or a PIL image) -> inference.Answer."""
    from .encoding import assistant_turn
    from .generation import generate_batch
    from .inference import Answer, parse_reply
    img = open_image(image) if isinstance(image, (str, Path)) else image
    messages = image_messages(question, choices, caption, system_prompt)
    prompt, inputs = conversation_inputs(model, processor, messages, [img], max_pixels)
    start = time.perf_counter()
    gen = generate_batch(model, processor.tokenizer, [prompt], settings, inputs=inputs)[0]
    raw = assistant_turn(prompt, gen.text)
    letter, text, reasoning = parse_reply(raw, choices)
    return Answer(letter, text, reasoning, raw, len(gen.token_ids), time.perf_counter() - start)


def demo_questions(sample_dir=SAMPLE_DIR) -> list[tuple[str, dict, str, Path]]:
    """(question, choices, gold letter, figure path) for the bundled demo figures (data/sample_vision/demo),
    read from the sample's test_2.csv rows about those figures."""
    from .data import read_pmc_vqa_csv
    demo = Path(sample_dir) / "demo"
    figs = {p.name: p for p in sorted(demo.glob("*")) if p.is_file()}
    records, _ = read_pmc_vqa_csv(Path(sample_dir) / "test_2.csv")
    out = []
    for r in records:
        if r.figure_path in figs:
            out.append((r.question, r.choices, r.answer_label, figs.pop(r.figure_path)))
    return out


def run_vision_demo(model, processor, settings, system_prompt=None, max_pixels=None, out=None) -> int:
    """Ask the demo questions about the bundled figures: figure, question, answer, expected, time."""
    import sys
    out = out or sys.stdout
    qs = demo_questions()
    if not qs:
        raise InputError(f"no demo figures found under {SAMPLE_DIR / 'demo'}")
    print(f"demo: {len(qs)} questions about the bundled figures ({settings.describe()})\n", file=out)
    right = 0
    for i, (q, choices, gold, path) in enumerate(qs, 1):
        ans = answer_image_question(q, choices, model, processor, path, system_prompt=system_prompt,
                                    settings=settings, max_pixels=max_pixels)
        right += ans.letter == gold
        print(f"[{i}] figure {path.name}: {q}", file=out)
        for k, v in choices.items():
            print(f"      {k}. {v}", file=out)
        shown = f"{ans.letter}. {ans.answer}" if ans.letter else (ans.answer or "(no parseable answer)")
        print(f"    answer: {shown}   (expected {gold}. {choices.get(gold, '?')})", file=out)
        print(f"    {ans.seconds:.2f} s, {ans.n_tokens} tokens\n", file=out)
    print(f"{right} of {len(qs)} demo answers as expected", file=out)
    return 0
