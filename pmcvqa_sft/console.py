"""The terminal front ends: the interactive chat (`--interactive`) and the built-in demo (`--demo`).

Chat: tokens stream as they are generated; the whole conversation goes through the chat template
(`encoding.render_prompt` on the message list), so follow-up questions see the earlier turns. Commands:
/help, /reset, /think on|off, /temp X, /exit. Ctrl-C during an answer stops the generation (the
console stays open); Ctrl-D or Ctrl-C at the prompt leaves cleanly. `readline` gives line
editing and history where it exists (not on plain Windows) and stdin is a terminal; piped stdin works
too (scripted sessions).
"""
from __future__ import annotations

import sys
import time

from . import prompts
from .encoding import assistant_turn, render_prompt
from .errors import InputError
from .generation import GenerationSettings, generate_batch, stream_generate
from .inference import build_messages, parse_reply

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
    from . import vision_infer
    _setup_readline()
    processor = tokenizer if vision_infer.is_vision_processor(tokenizer) else None
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
                    pending = vision_infer.console_image(processor, arg)
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
        inputs = vision_infer.conversation_inputs(model, processor, messages, images, max_pixels)[1] \
            if images else None
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
              + ("" if stats.get("finished", True) else ", cut at max_new_tokens") + "]", file=out)
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


def run_demo(model, tokenizer, settings: GenerationSettings, system_prompt=None, out=sys.stdout) -> int:
    """Ask the built-in questions one by one: question, answer, time and tokens/s for each."""
    print(f"demo: {len(DEMO_QUESTIONS)} questions ({settings.describe()})\n", file=out)
    for i, (question, choices) in enumerate(DEMO_QUESTIONS, 1):
        prompt = render_prompt(tokenizer, build_messages(question, choices, None, system_prompt))
        start = time.perf_counter()
        gen = generate_batch(model, tokenizer, [prompt], settings)[0]
        secs = time.perf_counter() - start
        raw = assistant_turn(prompt, gen.text)
        letter, text, reasoning = parse_reply(raw, choices)
        print(f"[{i}] {question}", file=out)
        for k, v in (choices or {}).items():
            print(f"      {k}. {v}", file=out)
        if reasoning:
            print(f"    reasoning: {' '.join(reasoning.split())[:300]}", file=out)
        if letter:
            shown = f"{letter}. {text}"
        else:
            shown = (f"(no parseable letter) {text}" if choices else text) if text else "(no parseable answer)"
        n = len(gen.token_ids)
        print(f"    answer: {shown}\n    {secs:.2f} s, {n} tokens, {n / secs if secs > 0 else 0:.1f} tokens/s\n",
              file=out)
    return 0
