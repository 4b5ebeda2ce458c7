"""The image-model pieces of training (`training.setup_run` dispatches here for image-text-to-text models).

- `check_model_kind`: a dataset preprocessed for a text model cannot train an image model and vice
  versa (the prompts differ: no image placeholder, another chat template); one-line error.
- `load_processor`: the processor (tokenizer + image processor + chat template) the adapter folder
  will carry, so inference uses the exact ones training used.
- `prepare_datasets`: like the text one, but keeps the figure columns and counts the image tokens in
  the length-grouping column (under `--max_pixels`).
- `make_collator`: the lazy `VisionCollator` reading figures from where preprocessing found them
  (preprocess_report.json's `images`), or from `--images` when the figures moved.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError


def dataset_kind(report: dict) -> str:
    return report.get("model_kind") or "text"  # reports older than the image path are text


def check_model_kind(report: dict, vision: bool, dataset_dir, model_name) -> None:
    kind = dataset_kind(report)
    if vision and kind != "vision":
        raise InputError(f"dataset '{dataset_dir}' was preprocessed for a text model (model_kind {kind}) but "
                         f"'{model_name}' is an image-text-to-text model; rerun preprocess_pmc_vqa_for_sft.py "
                         f"--tokenizer {model_name} --images PATH")
    if not vision and kind == "vision":
        raise InputError(f"dataset '{dataset_dir}' was preprocessed for an image model but '{model_name}' is a "
                         f"text model; pass --model with the image model it was built for, or rerun the "
                         f"preprocessor with --tokenizer {model_name}")


def load_processor(name: str):
    """(processor, tokenizer) of an image model; pad = EOS when the tokenizer has no pad token."""
    from .vision_processor import load_processor as _load
    proc = _load(name)
    tok = proc.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return proc, tok


def check_max_pixels(max_pixels, report: dict | None = None, log=print) -> None:
    """--max_pixels is at least one merged patch; a note when it exceeds the cap preprocessing counted
    image tokens with (rows may then run past its --max_length)."""
    if max_pixels is not None and max_pixels < 28 * 28:
        raise InputError(f"--max_pixels must be at least {28 * 28} (one 28 x 28 patch), got {max_pixels}")
    pre = ((report or {}).get("image_processor") or {}).get("max_pixels")
    if max_pixels is not None and pre and max_pixels > pre:
        log(f"note: --max_pixels {max_pixels} is above the {pre} preprocessing counted image tokens with; "
            f"large figures may make rows longer than its --max_length")


def prepare_datasets(dsd, o, image_processor, report=None, log=print):
    """(train, eval or None) with figure columns and a length column that counts image tokens."""
    from .collate import LENGTH_COLUMN
    from .vision_collate import VISION_COLUMNS, add_vision_length_column
    check_max_pixels(o.max_pixels, report, log)
    if "train" not in dsd or len(dsd["train"]) == 0:
        raise InputError(f"dataset '{o.dataset_dir}' has no train rows (splits: {dict(dsd.num_rows)})")
    keep = {"input_ids", "labels", LENGTH_COLUMN, "source_row", *VISION_COLUMNS}

    def trim(ds, n):
        missing = [c for c in VISION_COLUMNS if c not in ds.column_names]
        if missing:
            raise InputError(f"dataset '{o.dataset_dir}' lacks the figure columns {missing}; rerun "
                             f"preprocess_pmc_vqa_for_sft.py with --images")
        if n is not None:
            ds = ds.select(range(min(n, len(ds))))
        ds = add_vision_length_column(ds, image_processor, o.max_pixels)
        return ds.remove_columns([c for c in ds.column_names if c not in keep])

    train = trim(dsd["train"], o.max_samples)
    ev = dsd.get("validation")
    ev = trim(ev, o.max_eval_samples) if ev is not None and len(ev) else None
    return train, ev


def figure_loader(report: dict, images: str | None = None, dataset_dir=None):
    """ref -> PIL image, from preprocess_report.json's `images` (or `images`, a moved copy of them)."""
    from . import figures
    info = report.get("images") or {}
    if not info and not images:
        raise InputError(f"dataset '{dataset_dir}' records no figure source (preprocess_report.json has no "
                         f"'images'); rerun preprocess_pmc_vqa_for_sft.py with --images")
    root = images or info.get("root")
    kind = info.get("kind") or ("zip" if str(root).endswith(".zip") else "folder")
    if images:
        kind = "zip" if Path(images).suffix == ".zip" else "folder"
    if not root or not Path(root).exists():
        raise InputError(f"the figures of dataset '{dataset_dir}' are not at '{root}' any more; pass "
                         f"--images PATH (the folder or zip they moved to)")

    def load(ref):
        try:
            return figures.load_figure(root, ref, kind)
        except figures.FigureSkip as exc:  # it passed preprocessing's check, so it changed since
            raise InputError(f"figure '{ref}' of dataset '{dataset_dir}' ({root}) can no longer be read: "
                             f"{exc}; rerun preprocess_pmc_vqa_for_sft.py --images to re-check the figures") from None
    return load


def make_collator(processor, model, report: dict, max_pixels, images=None, dataset_dir=None,
                  blank: bool = False, with_row_ids: bool = False):
    from . import figures
    from .vision_collate import VisionCollator
    from .vision_model import wants_mm_token_type_ids
    from .vision_processor import image_token_id
    return VisionCollator(processor.image_processor, image_token_id(processor), processor.tokenizer.pad_token_id,
                          figure_loader(report, images, dataset_dir), max_pixels=max_pixels,
                          mm_token_type_ids=wants_mm_token_type_ids(model),
                          blank=figures.blank_like if blank else None, with_row_ids=with_row_ids)
