"""The on-disk contract between the preprocessor and the trainer/evaluator.

A preprocessed folder holds a `DatasetDict` written with `save_to_disk` (splits `train`, `validation`,
and `test` when test data was given) plus `preprocess_report.json` and `examples.json`.
Columns of every row:
    input_ids      int32 list, the generation prompt + target + EOS (no padding stored)
    labels         int32 list, -100 on every prompt token, = input_ids on the target and its EOS
    source_file    the CSV's file name;  source_row  0-based data row in that file
    question       the cleaned question;  caption  v2 caption or "" (provenance; the prompt already holds it)
    choices        struct {A, B, C, D} of strings, None where the question has no such choice
    answer_label   the resolved gold letter
    truncated      "" or what preprocessing cut to fit --max_length ("caption", "question"); the prompt
                   in input_ids is the one trained (and evaluated), the question column the full text
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputError

REPORT_NAME = "preprocess_report.json"
# The training output folder (train_sft_example.py --output_dir), read by the inference side.
ADAPTER_DIR = "adapter"
RUN_CARD = "run_card.json"
EXAMPLES_NAME = "examples.json"
TOKEN_COLUMNS = ("input_ids", "labels")
PROVENANCE_COLUMNS = ("source_file", "source_row", "question", "caption", "choices", "answer_label", "truncated")


def row_choices(row) -> dict[str, str]:
    """The present choices of a dataset row, in letter order: {"A": "...", "B": "..."}."""
    return {k: v for k, v in sorted(row["choices"].items()) if v}


def read_report(dataset_dir) -> dict:
    path = Path(dataset_dir) / REPORT_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"'{dataset_dir}' was not produced by preprocess_pmc_vqa_for_sft.py "
                         f"(no {REPORT_NAME}); run the preprocessor first") from None
    except ValueError as exc:
        raise InputError(f"file '{path}' is not valid JSON ({exc})") from None


def load_processed(dataset_dir, need_columns=TOKEN_COLUMNS):
    """(DatasetDict, report) of a preprocessor output folder; one-line errors for anything else."""
    from datasets import load_from_disk
    d = Path(dataset_dir)
    if not d.is_dir():
        raise InputError(f"dataset folder '{dataset_dir}' does not exist; run preprocess_pmc_vqa_for_sft.py "
                         f"--output_dir {dataset_dir} first")
    report = read_report(d)
    try:
        dsd = load_from_disk(str(d))
    except (FileNotFoundError, ValueError, OSError, IndexError) as exc:  # IndexError: a 0-shard split
        raise InputError(f"'{dataset_dir}' is not a saved dataset ({' '.join(str(exc).split())[:200]})") from None
    for split, ds in dsd.items():
        missing = [c for c in need_columns if c not in ds.column_names]
        if missing:
            raise InputError(f"dataset '{dataset_dir}' split '{split}' lacks columns {missing} "
                             f"(found {ds.column_names})")
    return dsd, report


def dataset_kind(report: dict) -> str:
    """`text` or `vision`: which kind of model a dataset was preprocessed for (older reports: text)."""
    return report.get("model_kind") or "text"


def check_model_kind(report: dict, vision: bool, dataset_dir, model_name) -> None:
    """A dataset preprocessed for a text model cannot train an image model and vice versa (the prompts
    differ: no image placeholder, another chat template); one-line error."""
    kind = dataset_kind(report)
    if vision and kind != "vision":
        raise InputError(f"dataset '{dataset_dir}' was preprocessed for a text model (model_kind {kind}) but "
                         f"'{model_name}' is an image-text-to-text model; rerun preprocess_pmc_vqa_for_sft.py "
                         f"--tokenizer {model_name} --images PATH")
    if not vision and kind == "vision":
        raise InputError(f"dataset '{dataset_dir}' was preprocessed for an image model but '{model_name}' is a "
                         f"text model; pass --model with the image model it was built for, or rerun the "
                         f"preprocessor with --tokenizer {model_name}")
