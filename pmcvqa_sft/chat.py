"""Conversation -> (input_ids, labels), token-exact with the model's own chat template.

Tokenizer and template facts this module is built on (DeepSeek-R1-Distill-Llama-8B):
- The template writes BOS itself. Tokenizing the rendered string with special tokens added gives a
  second BOS, so every rendered string here is tokenized with `add_special_tokens=False`.
- The generation prompt ends with `<｜Assistant｜><think>\\n`. For assistant turns it renders, the template
  drops everything up to and including `</think>`, so rendering the whole conversation would lose the
  reasoning and also the `<think>` opening the model really produces. We therefore render only the
  generation prompt (exactly the inference prompt) and append the target ourselves.
- The prompt and the target are tokenized separately. The inference prompt is tokenized on its own too,
  so this is what the model sees at inference; tokenizing the joined string could merge the prompt's
  final `\\n` with the target's first `\\n` into one token the model never sees after that prompt.
- pad = EOS. Labels are -100 on the prompt only; the EOS closing the target is trained (its label is the
  EOS id), otherwise the tuned model never learns to stop.
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

IGNORE_INDEX = -100

# For tokenizers without a chat template (plain base models). Documented in docs/PREPROCESSING.md.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Question:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def ensure_chat_template(tokenizer):
    """Give a template-less tokenizer the plain documented format (in place); returns the tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def template_hash(tokenizer) -> str:
    """sha256 of the chat template text: datasets and models must agree on it."""
    tmpl = getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE
    if isinstance(tmpl, dict):  # named templates
        tmpl = "\n".join(f"{k}={v}" for k, v in sorted(tmpl.items()))
    return hashlib.sha256(tmpl.encode("utf-8")).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 fingerprint of what maps text to ids: the vocabulary, the merges and the added tokens.

    Vocabulary size, template and EOS id can all match while the ids don't (a BPE retrained on other
    text), and a dataset tokenized with one trains garbage on the other. For fast tokenizers the Rust
    model's own serialization is hashed (vocab + merges, in id/rank order: deterministic, ~0.1 s for
    128k tokens) with the normalizer and pre-tokenizer; padding/truncation state is deliberately left
    out (it changes at run time). Slow tokenizers: the sorted vocabulary.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        for part in (backend.model, backend.normalizer, backend.pre_tokenizer):
            h.update(part.__getstate__() if part is not None else b"null")
            h.update(b"\0")
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(sorted(tokenizer.get_added_vocab().items()), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The inference prompt for `messages` (a trailing assistant turn is ignored)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _generation_tail(tokenizer, messages: Sequence[dict]) -> str:
    """What the generation prompt adds after the last user turn, e.g. `<｜Assistant｜><think>\\n`."""
    with_gen = render_prompt(tokenizer, messages)
    without = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False, tokenize=False)
    return with_gen[len(without):] if with_gen.startswith(without) else ""


def strip_prompt_overlap(prompt_tail: str, content: str) -> str:
    """Drop the start of `content` that the prompt already holds (the `<think>\\n` of DeepSeek's prompt)."""
    for k in range(min(len(prompt_tail), len(content)), 0, -1):
        if prompt_tail.endswith(content[:k]):
            return content[k:]
    return content


def assistant_turn(prompt: str, generated: str) -> str:
    """The whole assistant turn of a generation: the `<think>\n` that DeepSeek's generation prompt
    already opened (so it is not in the generated text) + the generated text."""
    from .prompts import THINK_OPEN
    return (THINK_OPEN if prompt.endswith(THINK_OPEN) else "") + generated


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """The reference: a conversation ending in an assistant turn -> (input_ids, labels).

    input_ids = tokens(generation prompt) + tokens(target) + [EOS]; labels are -100 on the prompt and
    equal the ids on the target and the EOS.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant turn (the target)")
    prompt = render_prompt(tokenizer, messages)
    target = strip_prompt_overlap(_generation_tail(tokenizer, messages[:-1]), messages[-1]["content"])
    prompt_ids = encode_text(tokenizer, prompt)
    target_ids = encode_text(tokenizer, target) + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


class PromptEncoder:
    """The fast path of `encode_conversation` for many single-turn rows (same tokens, verified).

    The template is rendered once around a sentinel user message and split into the text before and
    after it; each row is then plain string concatenation and one batched tokenizer call (Rust,
    parallel) instead of a Jinja render and a tokenizer call per row. `verify()` checks rows against
    `encode_conversation`; `preprocess` runs it on the first rows of every job.
    """

    _SENTINEL = "\x00USER-CONTENT\x00"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        ensure_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        msgs = self._messages(self._SENTINEL)
        rendered = render_prompt(tokenizer, msgs)
        if rendered.count(self._SENTINEL) != 1:
            raise ValueError("the chat template does not render the user message verbatim")
        self.head, self.tail = rendered.split(self._SENTINEL)
        self.gen_tail = _generation_tail(tokenizer, msgs)
        self.eos_id = tokenizer.eos_token_id

    def _messages(self, user_text: str) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys_msg + [{"role": "user", "content": user_text}]

    def prompt_text(self, user_text: str) -> str:
        return self.head + user_text + self.tail

    def prompt_ids(self, user_texts: Sequence[str]) -> list[list[int]]:
        texts = [self.prompt_text(u) for u in user_texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def target_ids(self, contents: Sequence[str]) -> list[list[int]]:
        targets = [strip_prompt_overlap(self.gen_tail, c) for c in contents]
        return [ids + [self.eos_id] for ids in self.tokenizer(targets, add_special_tokens=False)["input_ids"]]

    def verify(self, user_texts: Sequence[str], contents: Sequence[str]) -> None:
        """Raise if the fast path differs from `encode_conversation` on these rows."""
        prompts, targets = self.prompt_ids(user_texts), self.target_ids(contents)
        for i, (u, c) in enumerate(zip(user_texts, contents)):
            ref_ids, ref_labels = encode_conversation(
                self.tokenizer, self._messages(u) + [{"role": "assistant", "content": c}])
            if prompts[i] + targets[i] != ref_ids or [IGNORE_INDEX] * len(prompts[i]) + targets[i] != ref_labels:
                raise AssertionError(f"fast template path differs from apply_chat_template on row {i}")


def visualize_mask(tokenizer, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """Show which tokens are trained: trained spans in ⟦…⟧ (or green with color=True), prompt as is.

    Special tokens are shown by name, so a double BOS or a missing EOS is easy to spot.
    """
    out, span, trained = [], [], None

    def flush():
        if not span:
            return
        text = tokenizer.decode(span, skip_special_tokens=False)
        if trained:
            text = f"\x1b[1;32m{text}\x1b[0m" if color else f"⟦{text}⟧"
        out.append(text)

    for tok_id, lab in zip(input_ids, labels):
        is_trained = lab != IGNORE_INDEX
        if is_trained != trained:
            flush()
            span, trained = [], is_trained
        span.append(tok_id)
    flush()
    return "".join(out)
