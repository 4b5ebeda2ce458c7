"""The terminal front ends: the interactive chat (`--interactive`) and the built-in demo (`--demo`).

Chat: tokens stream as they are generated; the whole conversation goes through the chat template
(`encoding.render_prompt` on the message list), so follow-up questions see the earlier turns. Commands:
/help, /reset, /think on|off, /temp X, /exit. Ctrl-C during an answer stops the generation (the
console stays open); Ctrl-D or Ctrl-C at the prompt leaves cleanly. `readline` gives line
editing and history where it exists (not on plain Windows) and stdin is a terminal; piped stdin works
too (scripted sessions).
"""
from __future__ import annotations

from pathlib import Path
import sys
import time

from .. import prompts
from ..core.errors import InputError
from ..core.paths import SAMPLE_VISION_DIR
from ..data.figures import open_image
from ..data.pmc_vqa import read_pmc_vqa_csv
from ..format.encoding import render_prompt
from ..format.media import is_vision_processor
from .answer import ask, conversation_inputs
from .generation import GenerationSettings, room_in_context, stream_generate

HELP = """commands:
  /help          this help
  /reset         forget the conversation
  /think on|off  show or hide the reasoning (the text between <think> and </think>)
  /temp X        sampling temperature (0 = greedy)
  /image PATH    attach a figure to your next question (image models)
  /exit          leave (Ctrl-D and Ctrl-C work too)"""

OPEN, CLOSE = prompts.THINK_OPEN.strip(), prompts.THINK_CLOSE


class ThinkFilter:
    """Streaming filter that hides the think block when `show` is False.

    The prompt already opens the block (`<think>\\n`), so the stream starts inside it. A tag split
    across two pieces is held back until it is complete.
    """

    def __init__(self, show: bool, inside: bool = True):
        self.show, self.inside, self.buf, self.after_close = show, inside, "", False

    def feed(self, piece: str) -> str:
        self.buf += piece
        out = []
        while self.buf:
            tag = CLOSE if self.inside else OPEN
            pos = self.buf.find(tag)
            if pos < 0:
                keep = next((k for k in range(min(len(tag) - 1, len(self.buf)), 0, -1)
                             if tag.startswith(self.buf[-k:])), 0)  # a partial tag at the end
                text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                out.append(self._emit(text))
                break
            out.append(self._emit(self.buf[:pos]) + (self._emit(tag) if self.show else ""))
            self.buf = self.buf[pos + len(tag):]
            self.inside = not self.inside
            self.after_close = not self.inside
        return "".join(out)

    def _emit(self, text: str) -> str:
        if self.inside and not self.show:
            return ""
        if not self.show:
            text = text.replace(CLOSE, "")  # a stray second </think> (weak models) is not content either
        if self.after_close and not self.show:
            text = text.lstrip("\n")  # the blank lines after a hidden </think>
            if text:
                self.after_close = False
        return text

    def flush(self) -> str:
        rest, self.buf = self.buf, ""
        return self._emit(rest)


def _setup_readline():
    if not sys.stdin.isatty():
        return
    try:
        import readline  # noqa: F401  (importing it enables line editing for input())
    except ImportError:
        pass


def run_console(model, tokenizer, settings: GenerationSettings, system_prompt=None, show_think=True,
                out=sys.stdout, max_pixels=None) -> int:
    """The chat loop; returns the exit code (0). `tokenizer`: an image model's processor enables /image."""
    _setup_readline()
    processor = tokenizer if is_vision_processor(tokenizer) else None
    tokenizer = processor.tokenizer if processor is not None else tokenizer
    messages: list[dict] = []
    images: list = []  # the conversation's figures, in order (image models)
    pending = None     # the figure /image attached to the next question
    tty = sys.stdin.isatty()
    print(f"chat ({settings.describe()}); /help for commands, /exit or Ctrl-D to leave", file=out)
    while True:
        try:
            line = input("you> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            print("\nbye", file=out)
            return 0
        if not tty:
            print(f"you> {line}", file=out)
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                print("bye", file=out)
                return 0
            if cmd == "/help":
                print(HELP, file=out)
            elif cmd == "/image":
                try:
                    pending = console_image(processor, arg)
                    print(f"(figure {arg} attached to your next question)", file=out)
                except InputError as exc:
                    print(f"({exc})", file=out)
            elif cmd == "/reset":
                messages, images, pending = [], [], None
                print("(conversation cleared)", file=out)
            elif cmd == "/think":
                if arg not in ("on", "off"):
                    print("usage: /think on|off  (show or hide the reasoning)", file=out)
                    continue
                show_think = arg == "on"
                print(f"(reasoning {'shown' if show_think else 'hidden'})", file=out)
            elif cmd == "/temp":
                try:
                    t = float(arg)
                    if t < 0:
                        raise ValueError
                except ValueError:
                    print("usage: /temp X  (a number >= 0; 0 = greedy)", file=out)
                    continue
                settings.temperature, settings.do_sample = (t, True) if t > 0 else (settings.temperature, False)
                print(f"({settings.describe()})", file=out)
            else:
                print(f"unknown command '{text}'; /help lists them", file=out)
            continue
        if not messages and system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompts.image_content(text) if pending else text})
        images, pending = images + [pending] if pending else images, None
        prompt = render_prompt(tokenizer, messages)
        try:  # a figure the processor refuses, a prompt that fills the context: one line, the chat goes on
            inputs = conversation_inputs(model, processor, messages, images, max_pixels)[1] \
                if images else None
            room_in_context(model, len(inputs["input_ids"][0]) if inputs else
                            len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), 1)
        except (InputError, ValueError) as exc:
            print(f"({' '.join(str(exc).split())}; the question is dropped, /reset starts a new conversation)",
                  file=out)
            if not isinstance(messages.pop()["content"], str):
                images.pop()
            continue
        opened = prompt.endswith(prompts.THINK_OPEN)  # the prompt opened the think block
        filt = ThinkFilter(show_think, inside=opened)
        print("assistant> " + (OPEN + "\n" if show_think and filt.inside else ""), end="", file=out, flush=True)
        reply, stats, start = [], {}, time.perf_counter()
        pieces = stream_generate(model, tokenizer, prompt, settings, stats, inputs=inputs)
        try:
            for piece in pieces:
                reply.append(piece)
                print(filt.feed(piece), end="", file=out, flush=True)
        except KeyboardInterrupt:
            pieces.close()  # stops the generation itself and waits for it (Ctrl-C during printing)
            print(f"\n(interrupted after {stats.get('n_tokens', 0)} tokens; the question is dropped)", file=out)
            if not isinstance(messages.pop()["content"], str):
                images.pop()  # that question's figure goes with it
            continue
        print(filt.flush(), file=out)
        secs = time.perf_counter() - start
        print(f"[{stats.get('n_tokens', 0)} tokens, {secs:.1f} s"
              + ("" if stats.get("finished", True) else f", cut at {stats.get('max_new_tokens')} new tokens "
                 f"(--max_new_tokens or the model's context)") + "]", file=out)
        content = (prompts.THINK_OPEN if opened else "") + "".join(reply)
        messages.append({"role": "assistant", "content": content})


# ---------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------

DEMO_QUESTIONS = [
    ("Which stain detects iron deposits?",
     {"A": "Ziehl-Neelsen stain", "B": "Silver stain", "C": "Periodic acid-Schiff", "D": "Prussian blue"}),
    ("Which imaging modality uses high-frequency sound waves?",
     {"A": "Computed tomography", "B": "Ultrasound", "C": "Magnetic resonance imaging", "D": "Mammography"}),
    ("Which organ produces bile?", {"A": "Kidney", "B": "Spleen", "C": "Liver", "D": "Heart"}),
    ("Which imaging modality uses a strong magnetic field?",
     {"A": "Magnetic resonance imaging", "B": "Plain radiography", "C": "Fluoroscopy", "D": "Ultrasound"}),
    ("Which organ secretes insulin?", {"A": "Thyroid", "B": "Stomach", "C": "Lung", "D": "Pancreas"}),
    ("What does a Prussian blue stain show in a liver biopsy, and why is it ordered?", None),
]


def console_image(processor, path):
    """The figure of a console `/image PATH` (one-line errors: no image model, no such file)."""
    if processor is None:
        raise InputError("this model takes no images; start the console with an image model (e.g. --model "
                         "tiny-vision or an image model's --adapter)")
    if not path:
        raise InputError("usage: /image PATH")
    return open_image(path, log=print)


def demo_questions(sample_dir=SAMPLE_VISION_DIR) -> list[tuple[str, dict, str, Path]]:
    """(question, choices, gold letter, figure path) for the bundled demo figures (data/sample_vision/demo),
    read from the sample's test_2.csv rows about those figures."""
    demo = Path(sample_dir) / "demo"
    figs = {p.name: p for p in sorted(demo.glob("*")) if p.is_file()}
    records, _ = read_pmc_vqa_csv(Path(sample_dir) / "test_2.csv")
    out = []
    for r in records:
        if r.figure_path in figs:
            out.append((r.question, r.choices, r.answer_label, figs.pop(r.figure_path)))
    return out


def run_demo(model, tokenizer, settings: GenerationSettings, system_prompt=None, out=None, max_pixels=None) -> int:
    """Ask the built-in questions one by one: question, answer, time and tokens/s for each. An image
    model (`tokenizer` = its processor) is asked about the bundled demo figures, with the expected answer."""
    out = out or sys.stdout
    vision = is_vision_processor(tokenizer)
    if vision:
        qs = demo_questions()
        if not qs:
            raise InputError(f"no demo figures found under {SAMPLE_VISION_DIR / 'demo'}")
        print(f"demo: {len(qs)} questions about the bundled figures ({settings.describe()})\n", file=out)
    else:
        qs = [(q, c, None, None) for q, c in DEMO_QUESTIONS]
        print(f"demo: {len(qs)} questions ({settings.describe()})\n", file=out)
    right = 0
    for i, (question, choices, gold, figure) in enumerate(qs, 1):
        ans = ask(model, tokenizer, question, choices, settings, image=figure, system_prompt=system_prompt,
                  max_pixels=max_pixels)
        print(f"[{i}] figure {figure.name}: {question}" if figure else f"[{i}] {question}", file=out)
        for k, v in (choices or {}).items():
            print(f"      {k}. {v}", file=out)
        if ans.reasoning:
            print(f"    reasoning: {' '.join(ans.reasoning.split())[:300]}", file=out)
        if ans.letter:
            shown = f"{ans.letter}. {ans.answer}"
        else:
            shown = (f"(no parseable letter) {ans.answer}" if choices else ans.answer) if ans.answer \
                else "(no parseable answer)"
        expected = f"   (expected {gold}. {choices.get(gold, '?')})" if gold else ""
        right += gold is not None and ans.letter == gold
        secs, n = ans.seconds, ans.n_tokens
        print(f"    answer: {shown}{expected}\n    {secs:.2f} s, {n} tokens, "
              f"{n / secs if secs > 0 else 0:.1f} tokens/s\n", file=out)
    if vision:
        print(f"{right} of {len(qs)} demo answers as expected", file=out)
    return 0
