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
