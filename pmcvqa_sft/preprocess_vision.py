"""Preprocessing for image-text models (`--images`): figure checks, image prompts, image columns, report.

`preprocess.run_preprocess(..., vision=VisionPrep(images, processor, max_pixels))` calls in here:
- `check`: every row's `Figure_path` is resolved in the `--images` source and each distinct figure is
  opened and decoded once (a progress bar; threads, since PIL decodes without the GIL). Rows whose figure
  is missing / empty / unreadable / truncated / oversized / unsafe, or whose aspect ratio the processor
  refuses (over 200:1), are dropped and counted as `figure_<reason>` in the report's `skipped`.
- `row_encoder`: the conversation holds `{"type": "image"}` before the text; the prompt is the chat
  template's rendering tokenized with add_special_tokens=False: ONE `<|image_pad|>` per figure, not
  expanded (the expansion depends on `--max_pixels`, a training/inference choice; the collator expands
  it). The target is the answer line + EOS; the think block only where the generation prompt opens one.
- `extra_tokens`: the tokens each placeholder will expand to under `--max_pixels` (default: training's
  default, 512 x 28 x 28 pixels = 512 tokens at most) count against `--max_length`, so a row that fits
  here fits at training with the same or a smaller cap.
- `add_columns`: `image` (the figure ref), `image_width`, `image_height` (int32, of the decoded figure).
  No pixels are stored: figures stay in the folder / zip and are read per batch.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from . import figures, prompts
from .encoding import FastPromptEncoder, RowEncoder, render_prompt
from .errors import InputError
from .vision_processor import image_settings, image_token_id, num_image_tokens

IMAGE_SOURCE_HUB = "hub"


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
            image=True, think=self.think)

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


class VisionPrep:
    """The `--images` side of one preprocessing job (see the module docstring)."""

    kind = "vision"

    def __init__(self, images: str, processor, max_pixels: int | None = None, cache_dir=None,
                 workers: int | None = None, log=print):
        if max_pixels is not None and int(max_pixels) < 1:
            raise InputError(f"--max_pixels {max_pixels}: must be a positive pixel count (e.g. 200704 = 448x448)")
        self.images, self.processor, self.cache_dir, self.log = str(images), processor, cache_dir, log
        from .vision_processor import DEFAULT_MAX_PIXELS
        self.max_pixels_arg = None if max_pixels is None else int(max_pixels)
        # the training default unless told otherwise: a row that fits here fits at training
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        self.settings = image_settings(processor.image_processor, self.max_pixels)
        self.token_id = image_token_id(processor)
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.source: figures.FigureSource | None = None
        self.rows_skipped: Counter = Counter()    # rows dropped, by reason
        self.bad_figures: Counter = Counter()     # distinct figures (or Figure_path values), by reason
        self.info: dict[tuple[str, int], tuple[str, int, int, int]] = {}  # row -> ref, w, h, tokens
        self.checked = self.rows_checked = 0
        self.check_s = 0.0

    # ---------------------------------------------------------------- where the figures are
    def open(self, data: str, version: str) -> figures.FigureSource:
        path = self.images
        if path == IMAGE_SOURCE_HUB:
            from .sources import HUB_DATASET_ID
            local = os.path.exists(os.path.expanduser(str(data)))
            repo = HUB_DATASET_ID if local else str(data).strip()
            path = str(figures.hub_archive(repo, version, self.cache_dir, log=self.log))
        self.source = figures.FigureSource(path)
        return self.source

    # ---------------------------------------------------------------- the check
    def check(self, source: dict, data, skipped: Counter, progress: bool = True) -> dict:
        """Drop rows whose figure is unusable (counted in `skipped` as figure_<reason>); returns the
        remaining {split: records} and remembers each kept row's ref, size and image-token count."""
        from tqdm.auto import tqdm
        from .modeling import progress_bars_wanted  # no bar fragments in logs

        t0 = time.perf_counter()
        recs_all = [r for recs in source.values() for r in recs]
        version = "2" if any(r.caption is not None for r in recs_all) else "1"
        src = self.open(data, version)
        refs: dict[tuple[str, int], str] = {}
        bad_path: dict[str, str] = {}
        for r in recs_all:
            try:
                refs[(r.source_file, r.source_row)] = src.resolve(r.figure_path)
            except figures.FigureSkip as skip:
                bad_path.setdefault(r.figure_path, skip.reason)
        distinct = list(dict.fromkeys(refs.values()))
        results: dict[str, tuple[int, int] | str] = {}

        def one(ref):
            try:
                return ref, figures.check_figure(src.root, ref, src.kind)
            except figures.FigureSkip as skip:
                return ref, skip.reason

        with ThreadPoolExecutor(self.workers) as pool, \
                tqdm(total=len(distinct), desc="checking figures", unit="fig", disable=not progress_bars_wanted(progress)) as bar:
            for ref, res in pool.map(one, distinct, chunksize=16):
                results[ref] = res
                bar.update(1)
        self.checked += len(distinct)
        ip = self.processor.image_processor
        for reason in bad_path.values():
            self.bad_figures[reason] += 1
        for ref, res in results.items():
            if isinstance(res, str):
                self.bad_figures[res] += 1
        aspect_bad = set()
        kept = {}
        for split, recs in source.items():
            keep = []
            for r in recs:
                key = (r.source_file, r.source_row)
                self.rows_checked += 1
                ref = refs.get(key)
                res = results.get(ref) if ref is not None else bad_path[r.figure_path]
                if isinstance(res, tuple):
                    try:
                        n = num_image_tokens(res[0], res[1], ip, self.max_pixels)
                    except ValueError:  # smart_resize refuses an aspect ratio over 200:1
                        aspect_bad.add(ref)
                        res = "aspect_ratio"
                    else:
                        self.info[key] = (ref, res[0], res[1], n)
                        keep.append(r)
                        continue
                self.rows_skipped[res] += 1
                skipped[f"figure_{res}"] += 1
            if keep:
                kept[split] = keep
        self.bad_figures["aspect_ratio"] += len(aspect_bad)
        self.check_s += time.perf_counter() - t0
        if "train" not in kept:
            raise InputError(f"--images '{self.images}': no training row has a usable figure (rows skipped: "
                             f"{dict(self.rows_skipped)}; figures resolved under '{src.root}'"
                             f"{', prefix ' + repr(src.prefix) if src.prefix else ''})")
        return kept

    # ---------------------------------------------------------------- encoding and columns
    def row_encoder(self, tokenizer, system_prompt, reasoning, include_caption) -> ImageRowEncoder:
        return ImageRowEncoder(tokenizer, system_prompt, reasoning, include_caption, self.processor)

    def extra_tokens(self, rec) -> int:
        """The row's image tokens beyond the one stored placeholder."""
        return self.info[(rec.source_file, rec.source_row)][3] - 1

    def add_columns(self, feats, columns, records) -> None:
        import pyarrow as pa
        from datasets import Value

        info = [self.info[(r.source_file, r.source_row)] for r in records]
        feats["image"] = Value("string")
        feats["image_width"] = Value("int32")
        feats["image_height"] = Value("int32")
        columns["image"] = pa.array([i[0] for i in info], pa.string())
        columns["image_width"] = pa.array([i[1] for i in info], pa.int32())
        columns["image_height"] = pa.array([i[2] for i in info], pa.int32())

    def report(self, parts: dict) -> dict:
        """The report's image section; `parts`: {split: (records, prompts, targets)} as saved."""
        from .preprocess import _stats

        tokens = [self.info[(r.source_file, r.source_row)][3] for recs, _, _ in parts.values() for r in recs]
        used = {self.info[(r.source_file, r.source_row)][0] for recs, _, _ in parts.values() for r in recs}
        return {"images": {
            **(self.source.describe() if self.source else {}),
            "source": self.images,
            "checked": self.checked, "rows_checked": self.rows_checked,
            "figures_used": len(used),
            "skipped": dict(sorted(self.rows_skipped.items())),
            "bad_figures": dict(sorted((k, v) for k, v in self.bad_figures.items() if v)),
            "check_s": round(self.check_s, 3),
            "figures_per_s": round(self.checked / self.check_s, 1) if self.check_s > 0 else None,
            "image_tokens": _stats(tokens),
        }, "image_processor": {
            **self.settings, "max_pixels_arg": self.max_pixels_arg,
            "image_token": self.processor.image_token, "image_token_id": self.token_id,
            "class": type(self.processor.image_processor).__name__,
        }}


def vision_args(images, tokenizer_name: str, max_pixels, output_dir, overwrite):
    """The script's --images / --max_pixels / --tokenizer -> (tokenizer or None, VisionPrep or None).

    Checked before anything is loaded: --max_pixels needs --images; the output folder rule first, so a
    refused overwrite costs no model download."""
    from .preprocess import check_output_dir
    from .tiny_vision import TINY_VISION_ALIAS
    if images is None:
        if max_pixels is not None:
            raise InputError("--max_pixels needs --images (it sets how many tokens a figure becomes)")
        if tokenizer_name == TINY_VISION_ALIAS:  # text-only rows for the tiny image model's tokenizer
            from .vision_processor import load_processor
            return load_processor(tokenizer_name).tokenizer, None
        return None, None
    check_output_dir(output_dir, overwrite)
    from .vision_processor import load_processor
    processor = load_processor(tokenizer_name)
    return processor.tokenizer, VisionPrep(images, processor, max_pixels)
