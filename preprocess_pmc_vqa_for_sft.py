#!/usr/bin/env python
"""Tokenize PMC-VQA for supervised fine-tuning of DeepSeek-R1-Distill-Llama-8B (prompt masked, answer trained).

Offline, on the bundled sample and the embedded tiny tokenizer (seconds):
    python preprocess_pmc_vqa_for_sft.py --data data/sample --tokenizer tiny --output_dir outputs/pmc_vqa_tiny

The real thing (downloads only the PMC-VQA CSVs and the tokenizer from the Hugging Face Hub):
    python preprocess_pmc_vqa_for_sft.py --output_dir outputs/pmc_vqa_sft

An image-text model (Qwen2.5-VL) with the figures, here the bundled image sample and the embedded tiny
Qwen2.5-VL (figures read in place from the zip; see docs/VISION.md):
    python preprocess_pmc_vqa_for_sft.py --data data/sample_vision --images data/sample_vision/images_2.zip \
        --tokenizer tiny-vision --output_dir outputs/pmc_vqa_vision_tiny

v2 data with the figure caption in the prompt, and a short rationale in the think block:
    python preprocess_pmc_vqa_for_sft.py --data /path/to/PMC-VQA --output_dir outputs/pmc_vqa_v2 \\
        --include_caption --reasoning brief

Output (see docs/PREPROCESSING.md): a DatasetDict (train / validation / test) saved with save_to_disk,
preprocess_report.json and examples.json. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os

from pmcvqa_sft.data.sources import HUB_DATASET_ID
from pmcvqa_sft.core.errors import OneLineParser, run_main
from pmcvqa_sft.core.paths import DEFAULT_MODEL


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- data ----
    p.add_argument("--data", default=HUB_DATASET_ID,
                   help="a PMC-VQA CSV file, a folder with train.csv/test_clean.csv/test.csv (v1) or "
                        "train_2.csv/test_2.csv (v2), or a Hub dataset id (only its CSVs are downloaded); "
                        "offline: data/sample")
    p.add_argument("--max_samples", type=int, default=None,
                   help="keep only the first N rows of each source split (train, test); for quick runs")
    p.add_argument("--val_size", default="0.05",
                   help="validation rows carved from train: a fraction (0.05) or a count (500); 0 = none")
    p.add_argument("--seed", type=int, default=42, help="seed of the train/validation split")
    # ---- tokenizer ----
    p.add_argument("--tokenizer", default=DEFAULT_MODEL,
                   help="hub id or local folder of the model's tokenizer, or 'tiny' (embedded, offline); "
                        "with --images the model's processor (e.g. Qwen/Qwen2.5-VL-7B-Instruct, or "
                        "'tiny-vision', the embedded tiny Qwen2.5-VL)")
    p.add_argument("--max_length", type=int, default=1024,
                   help="max tokens per row (prompt + answer + EOS); longer rows get their caption, then "
                        "question shortened, never the answer; rows that still don't fit are skipped")
    # ---- prompt ----
    p.add_argument("--reasoning", choices=("none", "brief"), default="none",
                   help="think block content: empty (none) or a short rationale built from the row (brief)")
    p.add_argument("--rationales", default=None, metavar="FILE.jsonl",
                   help="sampled rationales (inference_example.py --sample_rationales): each kept reasoning goes "
                        "in its training row's think block (docs/REASONING.md)")
    p.add_argument("--rationale_missing", choices=("drop", "answer_only"), default="drop",
                   help="training rows without a kept rationale: drop them, or keep them with an empty think "
                        "block (default: %(default)s; counted in preprocess_report.json)")
    p.add_argument("--system_prompt", default=None,
                   help="system message text; default: prompts.SYSTEM_PROMPT (None: DeepSeek advises none)")
    p.add_argument("--include_caption", action="store_true",
                   help="put the figure caption (v2 data) into the prompt")
    # ---- images (image-text models) ----
    g = p.add_argument_group("images (image-text models such as Qwen2.5-VL; docs/VISION.md)")
    g.add_argument("--images", default=None,
                   help="the figures: a folder, a zip read in place (PMC-VQA's images.zip / images_2.zip), "
                        "or 'hub' (download the release's archive, size printed first); every figure is "
                        "checked once and rows with a missing or bad figure are skipped, counted by reason")
    g.add_argument("--max_pixels", type=int, default=None,
                   help="figure pixel cap (width x height after resizing) used to count image tokens against "
                        "--max_length (default: 401408 = 512 x 28 x 28, train_sft_example.py's default); "
                        "train with the same or a smaller cap")
    # ---- output ----
    p.add_argument("--output_dir", required=True, help="folder for the processed DatasetDict and reports")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    p.add_argument("--num_proc", type=int, default=1,
                   help="processes for writing the Arrow shards (tokenization is already multi-threaded)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # The Rust tokenizer parallelises batches itself; nothing here forks after it is used.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from pmcvqa_sft.preprocess.run import run_preprocess
    from pmcvqa_sft.preprocess.run import vision_args
    tokenizer, vision = vision_args(args.images, args.tokenizer, args.max_pixels, args.output_dir, args.overwrite)
    report = run_preprocess(
        data=args.data, tokenizer_name=args.tokenizer, output_dir=args.output_dir,
        max_length=args.max_length, max_samples=args.max_samples, val_size=args.val_size,
        overwrite=args.overwrite, num_proc=args.num_proc, system_prompt=args.system_prompt,
        reasoning=args.reasoning == "brief", include_caption=args.include_caption, seed=args.seed,
        tokenizer=tokenizer, vision=vision, rationales=args.rationales, rationale_missing=args.rationale_missing)
    summary = {k: report[k] for k in ("rows_read", "kept", "skipped", "truncated", "splits", "disk_ratio",
                                      "wall_s", "rows_per_s")}
    if vision is not None:
        summary["images"] = {k: report["images"][k] for k in ("kind", "checked", "skipped", "figures_per_s")}
    print(json.dumps(summary, indent=1))
    for split, paths in report["ignored_files"].items():
        print(f"note: not read ({split}): {', '.join(paths)}")
    print(f"saved to {args.output_dir} (report: preprocess_report.json, examples: examples.json)")
    return 0


if __name__ == "__main__":
    run_main(main)
