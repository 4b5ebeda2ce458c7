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
import os
from typing import Sequence

from .. import prompts

IGNORE_INDEX = -100
MIN_QUESTION_TOKENS = 8     # a question cut shorter than this is useless: skip the row instead
PREFIX_CHECK_ROWS = 64      # rows per batch tokenized whole to confirm the shared-prefix cut is exact
NO_HEAD: list[int] = []     # the head of a prompt tokenized whole

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
    return (prompts.THINK_OPEN if prompt.endswith(prompts.THINK_OPEN) else "") + generated


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


# ---------------------------------------------------------------- the batched fast path (preprocessing)
def batch_ids(tokenizer, texts) -> list[list[int]]:
    """Token ids of many texts without special tokens. Fast tokenizers go straight to the Rust backend
    (`encode_batch_fast`, no offsets): transformers' per-row Python conversion costs more than the
    tokenization itself. Same ids as `tokenizer(texts, add_special_tokens=False)`; `verify()` checks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    # A padded/truncated call such as tok(x, padding="max_length") leaves that state on the backend;
    # transformers clears it on its next call, and so must we.
    if backend.padding is not None:
        backend.no_padding()
    if backend.truncation is not None:
        backend.no_truncation()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]


class FastPromptEncoder(PromptEncoder):
    """`PromptEncoder` with the backend batch call and a shared-prefix cache; its inherited
    `verify()` compares these very methods with the per-row `apply_chat_template` reference.

    Every prompt starts with the same text (BOS, `<｜User｜>`, the instruction, `Question:`), about 40 %
    of its tokens. That prefix is tokenized once when cutting there is exact: the cut is placed before a
    space (where byte-level BPE pre-tokenizers always start a new piece), and a sample of rows of each
    batch is tokenized whole and compared; any difference and the batch is tokenized whole.
    """

    prefix_batches = prefix_exact = 0

    def prompt_parts(self, user_texts) -> list[tuple[list[int], list[int]]]:
        """Per row (head, rest) with prompt ids = head + rest; `head` is one list shared by the batch
        (never modified), so no per-row copy of the common tokens is made."""
        texts = [self.prompt_text(u) for u in user_texts]
        cut = os.path.commonprefix(texts).rfind(" ") if len(texts) > 1 else -1
        if cut > 0:
            head = batch_ids(self.tokenizer, [texts[0][:cut]])[0]
            rest = batch_ids(self.tokenizer, [t[cut:] for t in texts])
            sample = sorted({0, len(texts) - 1, *range(0, len(texts), max(1, len(texts) // PREFIX_CHECK_ROWS))})
            whole = batch_ids(self.tokenizer, [texts[i] for i in sample])
            self.prefix_batches += 1
            if all(head + rest[i] == w for i, w in zip(sample, whole)):
                self.prefix_exact += 1
                return [(head, r) for r in rest]
        return [(NO_HEAD, r) for r in batch_ids(self.tokenizer, texts)]

    def prompt_ids(self, user_texts):
        return [h + r for h, r in self.prompt_parts(user_texts)]

    def target_ids(self, contents):
        targets = [strip_prompt_overlap(self.gen_tail, c) for c in contents]
        return [ids + [self.eos_id] for ids in batch_ids(self.tokenizer, targets)]


class RowEncoder:
    """Record -> (prompt ids, target ids): batched fast path when `create_conversation` gives the
    plain [system?, user, assistant] shape, else the per-row reference `encode_conversation`."""

    rationales: dict | None = None  # question id -> kept reasoning (`--rationales`), put in the target

    def __init__(self, tokenizer, system_prompt, reasoning, include_caption):
        self.tok, self.system_prompt = tokenizer, system_prompt
        self.reasoning, self.include_caption = reasoning, include_caption
        self.fast = FastPromptEncoder(tokenizer, system_prompt)
        self.n_sys = 1 if system_prompt else 0

    def messages(self, rec, question=None, caption=None):
        cap = (rec.caption if caption is None else caption) if self.include_caption else None
        return prompts.create_conversation(
            rec.question if question is None else question, rec.choices, rec.answer_label,
            caption=cap or None, system_prompt=self.system_prompt, reasoning=self.reasoning,
            rationale=self.rationale(rec))

    def rationale(self, rec):
        return self.rationales.get(question_id(rec)) if self.rationales else None

    def user_text(self, msg) -> str:
        """The part of the user message the fast path splices between the template's head and tail."""
        return msg["content"]

    def _fast_ok(self, msgs) -> bool:
        roles = [m["role"] for m in msgs]
        return (roles == ["system"] * self.n_sys + ["user", "assistant"]
                and (not self.n_sys or msgs[0]["content"] == self.system_prompt))

    def encode(self, msgs_list):
        """-> (prompts as (head, rest) pairs, target ids incl. EOS)."""
        if all(self._fast_ok(m) for m in msgs_list):
            users, contents = [self.user_text(m[-2]) for m in msgs_list], [m[-1]["content"] for m in msgs_list]
            return _dedup_call(self.fast.prompt_parts, users), _dedup_call(self.fast.target_ids, contents)
        pairs = [encode_conversation(self.tok, m) for m in msgs_list]  # edited prompt shape
        prompts_, targets = [], []
        for ids, labels in pairs:
            n = labels.count(IGNORE_INDEX)
            prompts_.append((NO_HEAD, ids[:n]))
            targets.append(ids[n:])
        return prompts_, targets

    def verify(self, msgs_list) -> int:
        """Fast path == per-row apply_chat_template reference on these rows (raises otherwise)."""
        fast = [m for m in msgs_list if self._fast_ok(m)]
        if fast:
            self.fast.verify([self.user_text(m[-2]) for m in fast], [m[-1]["content"] for m in fast])
        return len(fast)

    def fit(self, rec, prompt, target, max_length):
        """Shorten caption, then question, until the row fits; (prompt ids, target, what) or None."""
        prompt = prompt[0] + prompt[1]
        if len(prompt) + len(target) <= max_length:
            return prompt, target, None
        fields = {"caption": (rec.caption or "") if self.include_caption else "", "question": rec.question}
        for name in ("caption", "question"):
            toks = encode_text(self.tok, fields[name]) if fields[name] else []
            floor = 0 if name == "caption" else min(MIN_QUESTION_TOKENS, len(toks))
            keep = len(toks)
            while len(prompt) + len(target) > max_length and keep > floor:
                keep = max(floor, keep - (len(prompt) + len(target) - max_length))
                fields[name] = self.tok.decode(toks[:keep]).replace("\ufffd", "").strip()
                ((head, rest),), (target,) = self.encode([self.messages(rec, fields["question"], fields["caption"])])
                prompt = head + rest
            if len(prompt) + len(target) <= max_length:
                return prompt, target, name
        return None


def _dedup_call(fn, texts):
    """Tokenize each distinct text once (targets repeat a lot: the same answer in many rows)."""
    uniq = list(dict.fromkeys(texts))
    if len(uniq) > 0.9 * len(texts):
        return fn(texts)
    table = dict(zip(uniq, fn(uniq)))
    return [table[t] for t in texts]


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


def opens_think(tokenizer) -> bool:
    """Whether the model's generation prompt opens a think block (DeepSeek-R1: yes; Qwen2.5-VL: no)."""
    return render_prompt(tokenizer, [{"role": "user", "content": "x"}]).endswith(prompts.THINK_OPEN)


class ImagePromptEncoder(FastPromptEncoder):
    """The batched prompt encoder with the user content as [image, text]: the template is rendered once
    around a sentinel text item, so each row is string concatenation + one batched tokenizer call."""

    def _messages(self, user_text: str) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys_msg + [{"role": "user", "content": prompts.image_content(user_text)}]


class ImageRowEncoder(RowEncoder):
    """`RowEncoder` for image conversations (see the module docstring); verified against the
    processor's own `apply_chat_template` on the first rows of every job."""

    def __init__(self, tokenizer, system_prompt, reasoning, include_caption, processor):
        super().__init__(tokenizer, system_prompt, reasoning, include_caption)
        self.processor = processor
        self.fast = ImagePromptEncoder(tokenizer, system_prompt)
        # Qwen2.5-VL's generation prompt opens no think block: its target is the answer line alone.
        self.think = self.fast.gen_tail.endswith(prompts.THINK_OPEN)

    def messages(self, rec, question=None, caption=None):
        cap = (rec.caption if caption is None else caption) if self.include_caption else None
        return prompts.create_conversation(
            rec.question if question is None else question, rec.choices, rec.answer_label,
            caption=cap or None, system_prompt=self.system_prompt, reasoning=self.reasoning,
            image=True, think=self.think, rationale=self.rationale(rec))

    def user_text(self, msg) -> str:
        return prompts.content_text(msg["content"])

    def _fast_ok(self, msgs) -> bool:
        content = msgs[-2]["content"] if len(msgs) >= 2 else None
        return (super()._fast_ok(msgs) and isinstance(content, list)
                and [item.get("type") for item in content] == ["image", "text"])

    def verify(self, msgs_list) -> int:
        n = super().verify(msgs_list)
        for i, msgs in enumerate(msgs_list):  # the processor's template renders the same prompt text
            ours = render_prompt(self.tok, msgs)
            theirs = self.processor.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
            if ours != theirs:
                raise AssertionError(f"tokenizer and processor chat templates differ on row {i}")
        return n


def question_id(row) -> str:
    """The stable id of a question across preprocessing runs: its source file name and row."""
    get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k, None))
    return f"{os.path.basename(str(get('source_file')))}:{get('source_row')}"


def load_rationales(path) -> dict[str, str]:
    """`--rationales FILE.jsonl` (evaluate.rationales output) -> {question id: kept reasoning}."""
    out, n = {}, 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # a torn last line of an interrupted sampling run
                rec = json.loads(line)
                if rec.get("kept") and rec.get("reasoning") is not None:
                    out[str(rec["id"])] = rec["reasoning"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--rationales '{path}' line {n}: {type(e).__name__}") from None
    return out
