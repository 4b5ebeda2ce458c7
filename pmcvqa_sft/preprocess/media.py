"""The media variant of a preprocessing job: `TextMedia` (text models: every hook does nothing) or
`VisionPrep` (`--images`: figure checks, image prompts, image columns, report).

`run.run_preprocess(..., vision=VisionPrep(images, processor, max_pixels))` calls in here:
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

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import os
import time

from ..core.errors import InputError
from ..core.notices import progress_bars_wanted
from ..data import figures
from ..data.sources import HUB_DATASET_ID
from ..format.encoding import ImageRowEncoder, RowEncoder
from ..format.media import DEFAULT_MAX_PIXELS, image_settings, image_token_id, num_image_tokens

IMAGE_SOURCE_HUB = "hub"


def length_stats(values) -> dict:
    """min / mean / p50 / p95 / max of a list of lengths ({} when empty)."""
    import numpy as np
    if len(values) == 0:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "mean": round(float(a.mean()), 2), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


class TextMedia:
    """The text variant: no figures, so every hook of the job does nothing."""

    kind = "text"

    def check(self, source: dict, data, skipped: Counter, progress: bool = True) -> dict:
        return source

    def row_encoder(self, tokenizer, system_prompt, reasoning, include_caption) -> RowEncoder:
        return RowEncoder(tokenizer, system_prompt, reasoning, include_caption)

    extra_tokens = None  # no tokens beyond the stored ids

    def add_columns(self, feats, columns, records) -> None:
        pass

    def report(self, parts: dict) -> dict:
        return {}


class VisionPrep:
    """The `--images` side of one preprocessing job (see the module docstring)."""

    kind = "vision"

    def __init__(self, images: str, processor, max_pixels: int | None = None, cache_dir=None,
                 workers: int | None = None, log=print):
        if max_pixels is not None and int(max_pixels) < 1:
            raise InputError(f"--max_pixels {max_pixels}: must be a positive pixel count (e.g. 200704 = 448x448)")
        self.images, self.processor, self.cache_dir, self.log = str(images), processor, cache_dir, log
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
        from datasets import Value
        import pyarrow as pa

        info = [self.info[(r.source_file, r.source_row)] for r in records]
        feats["image"] = Value("string")
        feats["image_width"] = Value("int32")
        feats["image_height"] = Value("int32")
        columns["image"] = pa.array([i[0] for i in info], pa.string())
        columns["image_width"] = pa.array([i[1] for i in info], pa.int32())
        columns["image_height"] = pa.array([i[2] for i in info], pa.int32())

    def report(self, parts: dict) -> dict:
        """The report's image section; `parts`: {split: (records, prompts, targets)} as saved."""
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
            "image_tokens": length_stats(tokens),
        }, "image_processor": {
            **self.settings, "max_pixels_arg": self.max_pixels_arg,
            "image_token": self.processor.image_token, "image_token_id": self.token_id,
            "class": type(self.processor.image_processor).__name__,
        }}
