"""The chat console: Ctrl-C stops the generation itself and the console stays usable; bad commands get
their usage line."""
from __future__ import annotations

import io
import os
import signal
import sys
import time

N_NEW = 150  # tokens the model must produce unless interrupted (EOS is blocked by min_new_tokens)


class InterruptingOut(io.StringIO):
    """stdout stand-in that presses Ctrl-C (a real SIGINT to this process) once, on the first piece of the
    first answer: the KeyboardInterrupt then hits the console wherever its main thread is."""

    def __init__(self):
        super().__init__()
        self.armed, self.fired = False, False

    def write(self, s):
        n = super().write(s)
        if "assistant>" in s and not self.fired:
            self.armed = True
        elif self.armed and s and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)
        return n


def test_ctrl_c_stops_generation_and_the_console_goes_on(tiny_dir, tiny_tokenizer, monkeypatch, one_thread):
    from transformers import AutoModelForCausalLM

    from pmcvqa_sft.infer.console import run_console
    from pmcvqa_sft.infer.generation import GenerationSettings
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    model.generation_config.min_new_tokens = N_NEW  # no early EOS: only the interrupt can end it sooner
    model.register_forward_pre_hook(lambda *_: time.sleep(0.005))  # a token takes a little while, as on 8B
    generated = []
    real_generate = model.generate

    def counting_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        generated.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Which organ produces bile?\n/think maybe\n"
                                                  "Which organ secretes insulin?\n/exit\n"))
    out = InterruptingOut()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = run_console(model, tiny_tokenizer, GenerationSettings(do_sample=False, max_new_tokens=N_NEW), out=out)
    finally:
        signal.signal(signal.SIGINT, old)
    text = out.getvalue()
    assert code == 0 and out.fired
    assert len(generated) == 2, text
    assert generated[0] < N_NEW, (generated, text)  # generate() itself returned early
    assert f"(interrupted after {generated[0]} tokens" in text
    assert "usage: /think on|off" in text and "unknown command" not in text
    assert generated[1] == N_NEW and f"[{N_NEW} tokens" in text  # the next question is answered in full
    assert text.rstrip().endswith("bye")


def test_refused_figure_and_overlong_prompt_are_one_line_and_the_chat_goes_on(tmp_path, monkeypatch, one_thread):
    """A 5000x10 figure (aspect_ratio) and a question past the model's context: one line each, the
    question is dropped, and the next question is answered in the same conversation."""
    from PIL import Image

    from pmcvqa_sft.infer.console import run_console
    from pmcvqa_sft.infer.generation import GenerationSettings
    from pmcvqa_sft.models.adapters import load_for_inference
    loaded = load_for_inference("tiny-vision", None, "none", log=lambda *_: None)
    Image.new("RGB", (5000, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (64, 48), "red").save(tmp_path / "ok.png")
    script = [f"/image {tmp_path / 'wide.png'}", f"/image {tmp_path / 'ok.png'}", "What colour is it?",
              "word " * 3000, "And the shape?", "/exit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    out = io.StringIO()
    code = run_console(loaded.model, loaded.processor, GenerationSettings(do_sample=False, max_new_tokens=4), out=out)
    text = out.getvalue()
    assert code == 0 and "aspect_ratio" in text and "200:1" in text
    assert f"(figure {tmp_path / 'ok.png'} attached" in text
    dropped = [line for line in text.splitlines() if "the question is dropped" in line]
    assert len(dropped) == 1 and "the model takes at most 2048" in dropped[0]
    assert text.count(" tokens, ") == 2, text  # the first and the last question were answered
    assert text.rstrip().endswith("bye")
