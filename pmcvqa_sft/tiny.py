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

Build: `python -m pmcvqa_sft.tiny --out artifacts/tiny-r1-llama` (about 30 s on 2 cores). Scripts
accept `--model tiny` / `--tokenizer tiny`, which builds it on first use.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
from pathlib import Path

from .atomic import atomic_dir

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD_LIKE = "<｜▁pad▁｜>"  # unused pad-like special token, as upstream has one
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"

TINY_ALIAS = "tiny"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "tiny-r1-llama"
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
    from . import prompts, sample_data
    demo = {"A": "first", "B": "second", "C": "third", "D": "fourth"}
    fixed = [prompts.format_user_prompt("Which?", demo, caption="Figure."),
             prompts.assistant_content("B", "second", prompts.make_reasoning("Which?", demo, "B", "Figure."))]
    return sample_data.all_text() + sample_data.pretraining_sentences() + fixed * 20


def _recipe_key() -> str:
    from . import sample_data
    blob = json.dumps([BUILD_VERSION, MODEL_KW, PRETRAIN, CHAT_TEMPLATE, _tokenizer_texts(),
                       sample_data.pretraining_sentences()], sort_keys=True)
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


def _pretrain(model, tokenizer, sentences, log=print):
    """Full-parameter causal-LM training on plain fact sentences (BOS + sentence + EOS)."""
    import torch
    from tqdm.auto import tqdm

    cfg = PRETRAIN
    rows = [[tokenizer.bos_token_id] + tokenizer(s, add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for s in sentences]
    rng = random.Random(cfg["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) *
                                              0.5 * (1 + math.cos(math.pi * s / cfg["steps"])))
    model.train()
    order: list[int] = []
    bar = tqdm(range(cfg["steps"]), desc="pretraining tiny base", leave=False, disable=None)  # None: off in logs
    for step in bar:
        if len(order) < cfg["batch_size"]:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[:cfg["batch_size"]]], order[cfg["batch_size"]:]
        width = max(map(len, batch))
        ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in batch])
        # padding masked by position, so the real EOS stays trained (pad = EOS)
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in batch])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log(f"tiny base pretrained: {cfg['steps']} steps, final loss {loss.item():.3f}")
    return loss.item()


def build_tiny(out_dir: str | os.PathLike = DEFAULT_DIR, overwrite: bool = False, log=print) -> Path:
    """Build the tokenizer and the pretrained tiny model into `out_dir` (atomic: temp folder + rename)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from . import sample_data

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True)")
    from .threads import configure_threads
    configure_threads(TINY_ALIAS)  # one thread unless told otherwise: 10x faster on a busy 2-core machine
    torch.manual_seed(PRETRAIN["seed"])
    tokenizer = build_tokenizer(_tokenizer_texts())
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **MODEL_KW)
    model = LlamaForCausalLM(config)
    final_loss = _pretrain(model, tokenizer, sample_data.pretraining_sentences(), log=log)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, do_sample=True,
                                               temperature=0.6, top_p=0.95)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_build.json").write_text(json.dumps(
            {"recipe": _recipe_key(), "pretrain_final_loss": final_loss, **PRETRAIN}, indent=2))
    return out


def ensure_built(out_dir, stamp_name: str, recipe_key, build, log=print, note: str = "") -> Path:
    """`out_dir`, built by `build(out, overwrite=True, log=log)` on first use and rebuilt when the
    `recipe` in its `stamp_name` file differs from `recipe_key()` (tiny.py and tiny_vision.py)."""
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


def resolve(name_or_path: str) -> str:
    """`tiny` -> the built tiny model folder; anything else unchanged (hub id or local folder)."""
    return str(ensure_tiny()) if name_or_path == TINY_ALIAS else name_or_path


def build_cli(argv, description: str, default_dir: Path, ensure, build) -> int:
    """`python -m pmcvqa_sft.tiny[_vision] [--out DIR] [--overwrite]`: build (or reuse) and print the folder."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(default_dir), help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        path = ensure(args.out)
    else:
        path = build(args.out, overwrite=args.overwrite)
    print(path)
    return 0


def main(argv=None) -> int:
    return build_cli(argv, "Build the embedded tiny model and tokenizer.", DEFAULT_DIR, ensure_tiny, build_tiny)


if __name__ == "__main__":
    raise SystemExit(main())
