"""The embedded offline image model: a tiny Qwen2.5-VL (random weights), tokenizer and image processor.

It stands in for Qwen/Qwen2.5-VL-7B-Instruct wherever the hub can't be reached (tests, the vision demo):
- the tokenizer is a byte-level BPE (vocabulary 800) trained here on the bundled samples' text, carrying
  Qwen's special tokens (`<|endoftext|>` = pad, `<|im_start|>`, `<|im_end|>` = EOS, `<|vision_start|>`,
  `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`), with a chat template that renders Qwen2.5-VL's
  format: a default system turn, `<|im_start|>role\\n...<|im_end|>\\n`, one
  `<|vision_start|><|image_pad|><|vision_end|>` per image item, generation prompt `<|im_start|>assistant\\n`
  (no think block);
- the model is a `Qwen2_5_VLForConditionalGeneration`: text part hidden 128, 2 layers, 4 heads / 2 KV heads,
  `mrope_section=[4, 6, 6]`, tied embeddings; vision part depth 2, hidden 64, patch 14, spatial merge 2,
  temporal patch 2, `out_hidden_size` = the text hidden size (about 0.66 M parameters in all);
- the image processor is transformers' PIL `Qwen2VLImageProcessorPil` (no torchvision needed) with
  min_pixels 56x56 (Qwen's own) and max_pixels 112x112, so a 112x112 figure becomes 16 `<|image_pad|>`.

Unlike the text tiny model it is not pretrained: a LoRA on the LM plus a trainable merger learns the bundled
colour task from random weights (measured in docs/VISION.md).

Build: `python -m pmcvqa_sft.tiny_vision [--out artifacts/tiny-vision] [--overwrite]` (a few seconds).
Scripts accept `--model tiny-vision` / `--tokenizer tiny-vision`, which builds it on first use.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import atomic_dir

TINY_VISION_ALIAS = "tiny-vision"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "tiny-vision"
BUILD_VERSION = 1  # bump when the recipe changes so cached builds are rebuilt

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIALS = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
DEFAULT_SYSTEM = "You are a helpful assistant."

# Renders the same format as Qwen2.5-VL-Instruct's template (written here, not copied): a default system
# turn when the first message is not a system one; string or list content; image items become
# <|vision_start|><|image_pad|><|vision_end|>; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
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


def _tokenizer_texts() -> list[str]:
    """Every string of the bundled samples plus the prompt text and every answer line of the image
    sample (rendered through prompts.py), repeated so that the instruction, `Answer:` and ` Red` are
    whole tokens: a target spelled letter by letter is far harder for the tiny model to learn."""
    from . import prompts, sample_data, vision_sample
    colours = list(vision_sample.COLOURS)
    fixed = [prompts.format_user_prompt(q, dict(zip(prompts.LETTERS, colours[i:] + colours[:i])))
             for i, q in enumerate(vision_sample.QUESTIONS)]
    fixed += [prompts.answer_line(letter, c) for letter in prompts.LETTERS for c in colours] + [DEFAULT_SYSTEM]
    return sample_data.all_text() + vision_sample.all_text() + fixed * 20


def _recipe_key() -> str:
    blob = json.dumps([BUILD_VERSION, TEXT_KW, VISION_KW, IMAGE_KW, VOCAB_SIZE, SEED, CHAT_TEMPLATE,
                       _tokenizer_texts()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tokenizer(texts):
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
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor():
    """transformers' PIL image processor for Qwen2-VL / 2.5-VL (works without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**IMAGE_KW)


def build_model(tokenizer):
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


def build_tiny_vision(out_dir: str | os.PathLike = DEFAULT_DIR, overwrite: bool = False, log=print) -> Path:
    """Build tokenizer, image processor and model into `out_dir` (atomic: temp folder + rename)."""
    from .vision_processor import make_processor

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True)")
    tokenizer = build_tokenizer(_tokenizer_texts())
    model = build_model(tokenizer)
    processor = make_processor(build_image_processor(), tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)  # tokenizer + preprocessor_config.json + chat template
        (tmp / "tiny_vision_build.json").write_text(json.dumps(
            {"recipe": _recipe_key(), "parameters": n_params, "text": TEXT_KW, "vision": VISION_KW,
             "image_processor": IMAGE_KW, "vocab_size": len(tokenizer)}, indent=2))
    log(f"built the tiny vision model in {out} ({n_params:,} parameters)")
    return out


def ensure_tiny_vision(out_dir: str | os.PathLike = DEFAULT_DIR, log=print) -> Path:
    """The tiny vision folder, built on first use and rebuilt when the recipe or the samples changed."""
    from .tiny import ensure_built
    return ensure_built(out_dir, "tiny_vision_build.json", _recipe_key, build_tiny_vision, log)


def resolve(name_or_path: str) -> str:
    """`tiny-vision` -> the built folder; anything else unchanged (hub id or local folder)."""
    return str(ensure_tiny_vision()) if name_or_path == TINY_VISION_ALIAS else name_or_path


def main(argv=None) -> int:
    from .tiny import build_cli
    return build_cli(argv, "Build the embedded tiny Qwen2.5-VL model, tokenizer and processor.", DEFAULT_DIR,
                     ensure_tiny_vision, build_tiny_vision)


if __name__ == "__main__":
    raise SystemExit(main())
