#!/usr/bin/env python
"""See what the model is trained on: preprocess a few PMC-VQA rows, print them with the trained tokens
marked, and check the invariants the trainer relies on (PASS/FAIL per check; exit 0 when all pass).

Offline (the bundled sample, the embedded tiny tokenizer):
    python test_preprocessing.py
With the real tokenizer (downloads it) or your own data:
    python test_preprocessing.py --tokenizer deepseek-ai/DeepSeek-R1-Distill-Llama-8B --data /path/to/PMC-VQA
An image-text model with the figures (the bundled image sample, the embedded tiny Qwen2.5-VL):
    python test_preprocessing.py --data data/sample_vision --images data/sample_vision/images_2.zip --tokenizer tiny-vision

Trained tokens are shown in ⟦…⟧ (green on a terminal). This is a user-facing script, not a pytest file.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pmcvqa_sft.core.errors import OneLineParser, run_main


def parse_args(argv=None):
    p = OneLineParser(description="Preprocess a few rows, show the mask, check the invariants.")
    # ---- data ----
    p.add_argument("--data", default="data/sample", help="PMC-VQA CSV file or folder (default: bundled sample)")
    p.add_argument("--n", type=int, default=10, help="rows to preprocess per split")
    p.add_argument("--show", type=int, default=10, help="rows to print with their mask")
    # ---- tokenizer ----
    p.add_argument("--tokenizer", default="tiny", help="hub id, local folder, or 'tiny' (embedded, offline)")
    # ---- prompt ----
    p.add_argument("--reasoning", choices=("none", "brief"), default="none", help="think block content")
    p.add_argument("--system_prompt", default=None, help="system message (default: prompts.SYSTEM_PROMPT)")
    p.add_argument("--include_caption", action="store_true", help="caption (v2 data) in the prompt")
    # ---- images (image-text models, docs/VISION.md) ----
    p.add_argument("--images", default=None,
                   help="figures (folder or zip) for an image-text model's --tokenizer (e.g. tiny-vision); "
                        "also checks that the processor expands each row's image placeholder as training does")
    return p.parse_args(argv)


def check_row(tok, row, gen_tail, sys_prompt, reasoning, include_caption, image=False) -> dict[str, bool]:
    """Each invariant for one row, recomputed independently of the preprocessor's fast path."""
    from pmcvqa_sft.format import encoding
    from pmcvqa_sft import prompts
    from pmcvqa_sft.data.store import row_choices
    ids, labels = row["input_ids"], row["labels"]
    msgs = prompts.create_conversation(row["question"], row_choices(row), row["answer_label"],
                                       caption=row["caption"] or None if include_caption else None,
                                       system_prompt=sys_prompt, reasoning=reasoning, image=image,
                                       think=gen_tail.endswith(prompts.THINK_OPEN))
    prompt = encoding.encode_text(tok, encoding.render_prompt(tok, msgs))
    n = len(prompt)
    target_text = encoding.strip_prompt_overlap(gen_tail, msgs[-1]["content"])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return {
        "one BOS, at position 0": bos is None or (ids[:1] == [bos] and ids.count(bos) == 1),
        "prompt = apply_chat_template(generation prompt)": ids[:n] == prompt,
        "prompt ends with the generation tail": tok.decode(ids[:n], skip_special_tokens=False).endswith(gen_tail),
        "labels -100 exactly on the prompt": (all(x == encoding.IGNORE_INDEX for x in labels[:n])
                                              and labels[n:] == ids[n:] and len(ids) > n),
        "target ends with EOS, EOS labelled": ids[-1] == eos and labels[-1] == eos,
        "decode(target) == expected answer text": tok.decode(ids[n:-1], skip_special_tokens=False) == target_text,
        # (Qwen's EOS <|im_end|> also closes the system and user turns: count it in the target only)
        "no padding (one EOS, nothing after it)": (ids[n:] if image else ids).count(eos) == 1
                                                  and len(ids) == len(labels),
    }


def check_images(proc, rows, images) -> dict[str, bool]:
    """One unexpanded placeholder per row, and the processor's own expansion of the prompt with the figure
    == `expand_image_tokens` of the stored ids (what the training collator does)."""
    from pmcvqa_sft.data import figures
    from pmcvqa_sft.format.media import expand_image_tokens, image_token_id, num_image_tokens
    tid, src = image_token_id(proc), figures.FigureSource(images)
    one = expand = True
    for _, row in rows:
        ids = row["input_ids"]
        one &= ids.count(tid) == 1
        n = row["labels"].count(-100)
        text = proc.tokenizer.decode(ids[:n], skip_special_tokens=False)
        fig = figures.load_figure(src.root, row["image"], src.kind)
        count = num_image_tokens(row["image_width"], row["image_height"], proc.image_processor)
        expand &= proc(text=[text], images=[fig])["input_ids"][0] == expand_image_tokens(ids[:n], None, [count], tid)[0]
    return {"one unexpanded image placeholder per row": one,
            "processor expansion == expand_image_tokens(stored prompt)": expand}


def main(argv=None) -> int:
    args = parse_args(argv)
    from pmcvqa_sft.format import encoding
    from pmcvqa_sft.data.store import load_processed
    from pmcvqa_sft.models.loading import load_tokenizer
    from pmcvqa_sft.preprocess.run import run_preprocess
    proc = vision = None
    if args.images:
        from pmcvqa_sft.preprocess.media import VisionPrep
        from pmcvqa_sft.models.loading import load_processor
        proc = load_processor(args.tokenizer)
        vision = VisionPrep(args.images, proc)
    tok = proc.tokenizer if proc is not None else load_tokenizer(args.tokenizer)
    reasoning = args.reasoning == "brief"
    with tempfile.TemporaryDirectory(prefix="test_preprocessing_") as tmp:
        out = Path(tmp) / "processed"
        report = run_preprocess(data=args.data, tokenizer_name=args.tokenizer, output_dir=str(out),
                                max_samples=args.n, system_prompt=args.system_prompt, reasoning=reasoning,
                                include_caption=args.include_caption, tokenizer=tok, progress=False, vision=vision)
        dsd, _ = load_processed(out)
        rows = [(s, r) for s in dsd for r in dsd[s]]
        int32 = all(str(dsd[s].features[c].feature.dtype) == "int32" for s in dsd for c in ("input_ids", "labels"))
    sys_prompt = report["system_prompt"]
    gen_tail = encoding.PromptEncoder(tok, sys_prompt).gen_tail
    if proc is not None:  # the image prompt's generation tail
        from pmcvqa_sft.format.encoding import ImagePromptEncoder
        gen_tail = ImagePromptEncoder(tok, sys_prompt).gen_tail
    color = sys.stdout.isatty()
    print(f"tokenizer {args.tokenizer} (vocab {report['vocab_size']}, EOS {report['eos_token_id']}); "
          f"{len(rows)} rows from {args.data}; splits {report['splits']}; trained tokens in "
          f"{'green' if color else '⟦…⟧'}\n")
    for split, row in rows[:args.show]:
        print(f"--- {split} {row['source_file']} row {row['source_row']} "
              f"({len(row['input_ids'])} tokens, {sum(x != encoding.IGNORE_INDEX for x in row['labels'])} trained)")
        print(encoding.visualize_mask(tok, row["input_ids"], row["labels"], color=color))
        print()
    results: dict[str, bool] = {}
    for _, row in rows:
        for name, ok in check_row(tok, row, gen_tail, sys_prompt, reasoning, args.include_caption,
                                  image=proc is not None).items():
            results[name] = results.get(name, True) and ok
    if proc is not None:
        results.update(check_images(proc, rows, args.images))
    results["token columns are int32"] = int32
    results["at least one row per split"] = all(len(dsd[s]) > 0 for s in dsd)
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    failed = [n for n, ok in results.items() if not ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed over {len(rows)} rows")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
