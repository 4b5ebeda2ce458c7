"""The embedded offline default: a tiny Llama-architecture model and tokenizer built locally.

It stands in for DeepSeek-R1-Distill-Llama-8B wherever the hub can't be reached (tests, `make demo`):
- the tokenizer is a byte-level BPE trained here on the bundled sample's text, with the same special
  tokens as the real one (BOS, EOS, `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`; pad = EOS;
  User/Assistant/think are added tokens that are not "special", as upstream marks them) and a chat
  template that renders the same format (BOS, system, `<｜User｜>`, `<｜Assistant｜>`, drops reasoning
  from rendered assistant turns, generation prompt ending `<｜Assistant｜><think>\\n`);
- the model is a `LlamaForCausalLM` (4 layers, hidden 128, GQA 4/2 heads, untied head) with a
  `generation_config` that samples at temperature 0.6, top_p 0.95 like the real one.

Why it is pretrained: LoRA cannot teach a randomly initialised model anything (its frozen random
`lm_head` caps how far a logit can rise, about 2.5 nats at hidden 128), so the builder first trains all
parameters on the sample's facts written as plain sentences, never in question/answer form. What the
LoRA fine-tune then learns - answering the questions - is visible in the demo's before/after table.

`tiny-reasoning` (make demo-reasoning; `build_tiny_reasoning`) is the same model with merged letter+word
tokens and binding drills in its pretraining; the embedded image model (`tiny-vision`) is built below it
in this file (see `build_tiny_vision`).

Build: `python -m pmcvqa_sft.models.tiny [--vision | --reasoning] [--out DIR] [--overwrite]` (about 30 s on
2 cores for the text model, about 2.5 min for tiny-reasoning, a few seconds for the image one). Scripts accept
`--model tiny` / `--tokenizer tiny`, `tiny-reasoning` and `tiny-vision`, which build them on first use.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path
import random

from .. import prompts
from ..core.atomic import atomic_dir
from ..core.paths import (TINY_ALIAS, TINY_DIR, TINY_REASONING_ALIAS, TINY_REASONING_DIR, TINY_VISION_ALIAS,
                          TINY_VISION_DIR)
from ..core.threads import configure_threads
from ..data import samples
from .processor import make_processor

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD_LIKE = "<｜▁pad▁｜>"  # unused pad-like special token, as upstream has one
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"

DEFAULT_DIR = TINY_DIR
BUILD_VERSION = 1  # bump when the recipe changes so cached builds are rebuilt

# Same output format as the DeepSeek-R1 template (written here, not copied): BOS, the system prompt with
# no marker, <｜User｜>q, <｜Assistant｜>a<｜end▁of▁sentence｜> with everything up to </think> dropped,
# and a generation prompt ending <｜Assistant｜><think>\n. Tool calls are not supported.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system_prompt = m['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

MODEL_KW = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
PRETRAIN = dict(steps=600, batch_size=16, lr=3e-3, warmup=30, seed=0, vocab_size=1024)


def _tokenizer_texts() -> list[str]:
    """The sample's text plus the fixed prompt strings (rendered through prompts.py, so edits count)."""
    demo = {"A": "first", "B": "second", "C": "third", "D": "fourth"}
    fixed = [prompts.format_user_prompt("Which?", demo, caption="Figure."),
             prompts.assistant_content("B", "second", prompts.make_reasoning("Which?", demo, "B", "Figure."))]
    return samples.all_text() + samples.pretraining_sentences() + fixed * 20


def _recipe_key() -> str:
    blob = json.dumps([BUILD_VERSION, MODEL_KW, PRETRAIN, CHAT_TEMPLATE, _tokenizer_texts(),
                       samples.pretraining_sentences()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tokenizer(texts):
    """Byte-level BPE on `texts` with the DeepSeek special tokens, wrapped for AutoTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=PRETRAIN["vocab_size"], special_tokens=[BOS, EOS, PAD_LIKE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (USER, ASSISTANT, THINK, END_THINK)])
    # Like Llama 3: add_special_tokens=True prepends BOS (so a rendered prompt must not use it).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=MODEL_KW["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pretrain(model, tokenizer, sentences, log=print, cfg=PRETRAIN, make_drills=None):
    """Full-parameter causal-LM training on plain fact sentences (BOS + sentence + EOS). With `make_drills`
    (rng -> (ids, labels) pairs), each batch row is a drill row with probability cfg["drill_share"]
    (tiny-reasoning)."""
    import torch
    from tqdm.auto import tqdm

    rows = sentence_rows(tokenizer, sentences)
    rng = random.Random(cfg["seed"])
    drills = make_drills(rng) if make_drills is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) *
                                              0.5 * (1 + math.cos(math.pi * s / cfg["steps"])))
    model.train()
    order: list[int] = []
    bar = tqdm(range(cfg["steps"]), desc="pretraining tiny base", leave=False, disable=None)  # None: off in logs
    for step in bar:
        if drills:
            batch = [rng.choice(drills) if rng.random() < cfg["drill_share"] else rng.choice(rows)
                     for _ in range(cfg["batch_size"])]
            loss = _split_loss(model, batch, tokenizer.eos_token_id)
        else:  # `tiny`: the plain padded batch, so its build stays byte-identical
            if len(order) < cfg["batch_size"]:
                order += rng.sample(range(len(rows)), len(rows))
            batch, order = [rows[i] for i in order[:cfg["batch_size"]]], order[cfg["batch_size"]:]
            ids, attn, labels = _pad(batch, tokenizer.eos_token_id)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log(f"tiny base pretrained: {cfg['steps']} steps, final loss {loss.item():.3f}")
    return loss.item()


def sentence_rows(tokenizer, sentences) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) pretraining rows of plain sentences: BOS + sentence + EOS, trained whole."""
    rows = []
    for s in sentences:
        ids = [tokenizer.bos_token_id] + tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((ids, ids))
    return rows


def split_parts(batch) -> list[list]:
    """The batch's rows trained whole (fact sentences) and its rows with a masked prompt (drills), each
    non-empty group once: what `_split_loss` sends through the model as separate batches."""
    parts = ([r for r in batch if -100 not in r[1]], [r for r in batch if -100 in r[1]])
    return [part for part in parts if part]


def _pad(batch, pad_id):
    """(ids, attention mask, labels) tensors for (ids, labels) rows, right-padded to the longest."""
    import torch

    width = max(len(r) for r, _ in batch)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r, _ in batch])
    # padding masked by position, so the real EOS stays trained (pad = EOS)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in batch])
    return ids, attn, labels


def _split_loss(model, batch, pad_id):
    """The same loss as `model(..., labels=...)` on the whole batch (mean cross-entropy over every trained
    token), computed cheaper: short fact sentences and long drill rows go through the model as two batches,
    so sentences are not padded to a drill's width, and the head is applied only where a label is trained
    (a drill trains its ~8 answer tokens of ~70; the head is about a sixth of this model's per-token work)."""
    import torch

    total, count = 0.0, 0
    for part in split_parts(batch):
        ids, attn, labels = _pad(part, pad_id)
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100  # position t predicts token t+1
        logits = model.lm_head(hidden[:, :-1][keep]).float()
        total = total + torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def build_tiny(out_dir: str | os.PathLike = DEFAULT_DIR, overwrite: bool = False, log=print) -> Path:
    """Build the tokenizer and the pretrained tiny model into `out_dir` (atomic: temp folder + rename)."""
    return _build_llama(out_dir, overwrite, log, lambda: build_tokenizer(_tokenizer_texts()), PRETRAIN,
                        "tiny_build.json", _recipe_key)


def _build_llama(out_dir, overwrite, log, make_tokenizer, cfg, stamp_name, recipe_key, drills=None) -> Path:
    """Tokenizer from `make_tokenizer()`, a LlamaForCausalLM (MODEL_KW) pretrained by `_pretrain` with `cfg`
    (and `drills(tokenizer)` -> drill rows, if given), saved atomically with its `stamp_name` record."""
    import time

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True)")
    start = time.time()
    configure_threads(TINY_ALIAS)  # one thread unless told otherwise: 10x faster on a busy 2-core machine
    torch.manual_seed(cfg["seed"])
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **MODEL_KW)
    model = LlamaForCausalLM(config)
    final_loss = _pretrain(model, tokenizer, samples.pretraining_sentences(), log=log, cfg=cfg,
                           make_drills=drills(tokenizer) if drills else None)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, do_sample=True,
                                               temperature=0.6, top_p=0.95)
    record = {"recipe": recipe_key(), "pretrain_final_loss": final_loss, **cfg}
    if drills:  # tiny-reasoning only: tiny's record stays byte-identical to earlier builds
        record["build_seconds"] = round(time.time() - start, 1)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / stamp_name).write_text(json.dumps(record, indent=2))
    return out


def ensure_built(out_dir, stamp_name: str, recipe_key, build, log=print, note: str = "") -> Path:
    """`out_dir`, built by `build(out, overwrite=True, log=log)` on first use and rebuilt when the
    `recipe` in its `stamp_name` file differs from `recipe_key()` (both tiny models)."""
    from filelock import FileLock

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel test runs / scripts build it once
        stamp = out / stamp_name
        if stamp.exists():
            try:
                if json.loads(stamp.read_text()).get("recipe") == recipe_key():
                    return out
            except (OSError, ValueError):
                pass
        if note:
            log(note.format(out=out))
        return build(out, overwrite=True, log=log)


def ensure_tiny(out_dir: str | os.PathLike = DEFAULT_DIR, log=print) -> Path:
    """The tiny model folder, built on first use and rebuilt when the recipe or sample changed."""
    return ensure_built(out_dir, "tiny_build.json", _recipe_key, build_tiny, log,
                        "building the embedded tiny model in {out} (about 30 s, once)")


# ---------------------------------------------------------------------------------------------------
# `tiny-reasoning` (make demo-reasoning): the same Llama, tokenizer plus one added token per (choice letter,
# first word of a sample answer) - `C. Aorta` is one id in the choice line and in `Answer: C. Aorta` - and
# pretrained longer on half fact sentences, half chat-format binding drills (`Which choice is <text>?`
# over 4 shuffled answers -> `Answer: X. <text>`). With it the letter is learnable: picking the merged
# token present in the prompt. The default `tiny` does not have it (its letter stays near chance).
# A tiny-model/sample trick only: the merged tokens exist for the sample's answers alone.
# ---------------------------------------------------------------------------------------------------

REASONING_PRETRAIN = dict(PRETRAIN, steps=1500, drill_share=0.5, drill_rows=6000)


def answer_texts() -> list[str]:
    """The sample's answer texts (every choice of data/sample is one of them)."""
    return sorted({a for _c, a, _p in samples.FACTS})


def merged_tokens() -> list[str]:
    """`A. Aorta` ... `D. <word>`: each choice letter with the first word of each answer text."""
    words = sorted({t.split()[0] for t in answer_texts()})
    return [f"{L}. {w}" for w in words for L in prompts.LETTERS]


def build_reasoning_tokenizer():
    """`build_tokenizer` plus the merged letter+word tokens (single_word: `C. Aort` never matches in `C. Aortic`)."""
    from tokenizers import AddedToken

    tok = build_tokenizer(_tokenizer_texts())
    tok.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in merged_tokens()])
    return tok


def drill_rows(n: int, rng: random.Random) -> list[dict]:
    """Binding drill rows: `Which choice is <text>?` over 4 random answer texts, the gold at a random letter."""
    texts, rows = answer_texts(), []
    for _ in range(n):
        ch = rng.sample(texts, 4)
        g = rng.randrange(4)
        rows.append({"question": f"Which choice is {ch[g]}?", "choices": dict(zip(prompts.LETTERS, ch)),
                     "label": prompts.LETTERS[g]})
    return rows


def _drills(tokenizer):
    """rng -> drill (ids, labels) pairs in the training format (chat template, empty think, loss on the answer)."""
    from ..format.encoding import PromptEncoder

    def make(rng):
        enc = PromptEncoder(tokenizer, prompts.SYSTEM_PROMPT)
        rows = drill_rows(REASONING_PRETRAIN["drill_rows"], rng)
        P = enc.prompt_ids([prompts.format_user_prompt(r["question"], r["choices"]) for r in rows])
        T = enc.target_ids([prompts.assistant_content(r["label"], r["choices"][r["label"]], "") for r in rows])
        return [(p + t, [-100] * len(p) + t) for p, t in zip(P, T)]
    return make


def _reasoning_recipe_key() -> str:
    blob = json.dumps([BUILD_VERSION, "reasoning", MODEL_KW, REASONING_PRETRAIN, CHAT_TEMPLATE, _tokenizer_texts(),
                       samples.pretraining_sentences(), merged_tokens(), prompts.SYSTEM_PROMPT,
                       prompts.format_user_prompt("Which?", {"A": "a", "B": "b", "C": "c", "D": "d"}),
                       prompts.assistant_content("B", "b", "")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tiny_reasoning(out_dir: str | os.PathLike = TINY_REASONING_DIR, overwrite: bool = False,
                         log=print) -> Path:
    """Build `tiny-reasoning` into `out_dir` (atomic); about 2.5 min on one free core (1500 steps)."""
    return _build_llama(out_dir, overwrite, log, build_reasoning_tokenizer, REASONING_PRETRAIN,
                        "tiny_reasoning_build.json", _reasoning_recipe_key, drills=_drills)


def ensure_tiny_reasoning(out_dir: str | os.PathLike = TINY_REASONING_DIR, log=print) -> Path:
    """The tiny-reasoning folder, built on first use and rebuilt when the recipe or sample changed."""
    return ensure_built(out_dir, "tiny_reasoning_build.json", _reasoning_recipe_key, build_tiny_reasoning, log,
                        "building the tiny-reasoning model in {out} (about 2.5 min, once)")


# ---------------------------------------------------------------------------------------------------
# The embedded image model: a tiny Qwen2.5-VL (random weights), tokenizer and image processor.
# It stands in for Qwen/Qwen2.5-VL-7B-Instruct wherever the hub can't be reached (tests, the vision demo):
# - the tokenizer is a byte-level BPE (vocabulary 800) trained here on the bundled samples' text, carrying
#   Qwen's special tokens (<|endoftext|> = pad, <|im_start|>, <|im_end|> = EOS, <|vision_start|>,
#   <|vision_end|>, <|image_pad|>, <|video_pad|>), with a chat template that renders Qwen2.5-VL's format:
#   a default system turn, one <|vision_start|><|image_pad|><|vision_end|> per image item, generation
#   prompt <|im_start|>assistant\n (no think block);
# - the model is a Qwen2_5_VLForConditionalGeneration: text part hidden 128, 2 layers, 4 heads / 2 KV
#   heads, mrope_section=[4, 6, 6], tied embeddings; vision part depth 2, hidden 64, patch 14, spatial
#   merge 2, temporal patch 2 (about 0.66 M parameters in all);
# - the image processor is transformers' PIL Qwen2VLImageProcessorPil (no torchvision needed) with
#   min_pixels 56x56 and max_pixels 112x112, so a 112x112 figure becomes 16 <|image_pad|>.
# Unlike the text tiny model it is not pretrained: a LoRA on the LM plus a trainable merger learns the
# bundled colour task from random weights (measured in docs/VISION.md).
# ---------------------------------------------------------------------------------------------------

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIALS = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
DEFAULT_SYSTEM = "You are a helpful assistant."

# Renders the same format as Qwen2.5-VL-Instruct's template (written here, not copied): a default system
# turn when the first message is not a system one; string or list content; image items become
# <|vision_start|><|image_pad|><|vision_end|>; the generation prompt opens the assistant turn.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' or 'video' in item %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXT_KW = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]})
VISION_KW = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
IMAGE_KW = dict(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)
VOCAB_SIZE, SEED = 800, 0


def _vision_tokenizer_texts() -> list[str]:
    """Every string of the bundled samples plus the prompt text and every answer line of the image
    sample (rendered through prompts.py), repeated so that the instruction, `Answer:` and ` Red` are
    whole tokens: a target spelled letter by letter is far harder for the tiny model to learn."""
    colours = list(samples.COLOURS)
    fixed = [prompts.format_user_prompt(q, dict(zip(prompts.LETTERS, colours[i:] + colours[:i])))
             for i, q in enumerate(samples.QUESTIONS)]
    fixed += [prompts.answer_line(letter, c) for letter in prompts.LETTERS for c in colours] + [DEFAULT_SYSTEM]
    return samples.all_text() + samples.vision_all_text() + fixed * 20


def _vision_recipe_key() -> str:
    blob = json.dumps([BUILD_VERSION, TEXT_KW, VISION_KW, IMAGE_KW, VOCAB_SIZE, SEED, VISION_CHAT_TEMPLATE,
                       _vision_tokenizer_texts()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_vision_tokenizer(texts):
    """Byte-level BPE on `texts` with Qwen's special tokens (no BOS, like Qwen), for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   model_max_length=TEXT_KW["max_position_embeddings"])
    fast.chat_template = VISION_CHAT_TEMPLATE
    return fast


def build_image_processor():
    """transformers' PIL image processor for Qwen2-VL / 2.5-VL (works without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**IMAGE_KW)


def build_vision_model(tokenizer):
    """The random-weight tiny Qwen2.5-VL whose special token ids match `tokenizer`."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(SEED)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(TEXT_KW, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids[IM_END],
                pad_token_id=ids[PAD], tie_word_embeddings=True)
    vision = dict(VISION_KW, out_hidden_size=TEXT_KW["hidden_size"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
                              video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
                              vision_end_token_id=ids[VISION_END], tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Like the Instruct release: stop on <|im_end|> (or <|endoftext|>), pad with <|endoftext|>; greedy.
    model.generation_config = GenerationConfig(eos_token_id=[ids[IM_END], ids[PAD]], pad_token_id=ids[PAD],
                                               do_sample=False)
    return model


def build_tiny_vision(out_dir: str | os.PathLike = TINY_VISION_DIR, overwrite: bool = False, log=print) -> Path:
    """Build tokenizer, image processor and model into `out_dir` (atomic: temp folder + rename)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True)")
    tokenizer = build_vision_tokenizer(_vision_tokenizer_texts())
    model = build_vision_model(tokenizer)
    processor = make_processor(build_image_processor(), tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)  # tokenizer + preprocessor_config.json + chat template
        (tmp / "tiny_vision_build.json").write_text(json.dumps(
            {"recipe": _vision_recipe_key(), "parameters": n_params, "text": TEXT_KW, "vision": VISION_KW,
             "image_processor": IMAGE_KW, "vocab_size": len(tokenizer)}, indent=2))
    log(f"built the tiny vision model in {out} ({n_params:,} parameters)")
    return out


def ensure_tiny_vision(out_dir: str | os.PathLike = TINY_VISION_DIR, log=print) -> Path:
    """The tiny vision folder, built on first use and rebuilt when the recipe or the samples changed."""
    return ensure_built(out_dir, "tiny_vision_build.json", _vision_recipe_key, build_tiny_vision, log)


def resolve(name_or_path: str) -> str:
    """`tiny` / `tiny-vision` / `tiny-reasoning` -> the built folder; anything else unchanged (hub id or local folder)."""
    if name_or_path == TINY_ALIAS:
        return str(ensure_tiny())
    if name_or_path == TINY_VISION_ALIAS:
        return str(ensure_tiny_vision())
    if name_or_path == TINY_REASONING_ALIAS:
        return str(ensure_tiny_reasoning())
    return name_or_path


def main(argv=None) -> int:
    """`python -m pmcvqa_sft.models.tiny [--vision | --reasoning] [--out DIR] [--overwrite]`: build (or reuse),
    print the folder."""
    p = argparse.ArgumentParser(prog="python -m pmcvqa_sft.models.tiny",
                                description="Build the embedded tiny model and tokenizer (--vision: the tiny "
                                            "Qwen2.5-VL model, tokenizer and image processor; --reasoning: "
                                            "tiny-reasoning, the letter-binding variant for make demo-reasoning).")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--vision", action="store_true", help="build the tiny image model (tiny-vision)")
    kind.add_argument("--reasoning", action="store_true", help="build tiny-reasoning (merged letter+word "
                                                               "tokens, binding drills; a few minutes)")
    p.add_argument("--out", default=None, help=f"output folder (default: {TINY_DIR}; {TINY_VISION_DIR} with "
                                               f"--vision; {TINY_REASONING_DIR} with --reasoning)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")
    args = p.parse_args(argv)
    ensure, build, default = ((ensure_tiny_vision, build_tiny_vision, TINY_VISION_DIR) if args.vision else
                              (ensure_tiny_reasoning, build_tiny_reasoning, TINY_REASONING_DIR) if args.reasoning
                              else (ensure_tiny, build_tiny, TINY_DIR))
    out = args.out or str(default)
    print(ensure(out) if Path(out).exists() and not args.overwrite else build(out, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
