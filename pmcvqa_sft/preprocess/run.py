"""PMC-VQA CSVs -> a tokenized, masked DatasetDict on disk (the contract in `data/store.py`).

Pipeline: resolve `--data` (file / folder / Hub id) -> read and validate the CSVs (`data.py`) -> build
each row's conversation with `prompts.create_conversation` (the file users edit) -> tokenize prompts and
targets in big batches with `encoding.PromptEncoder` (token-exact with `apply_chat_template`, verified on
the first rows of every job) -> shorten or skip rows over `max_length` -> carve a seeded validation
split from train -> build Arrow columns directly (int32, no padding) -> `save_to_disk` into a temp
folder beside `output_dir`, then rename it into place.

Truncation never cuts the answer: the caption (if included) is shortened first, then the question
(tokens dropped from its end, keeping at least `MIN_QUESTION_TOKENS`); choices and target stay intact.
A row that still does not fit is skipped as `too_long`.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
from itertools import chain, islice
import json
import math
import os
from pathlib import Path
import platform
import shutil
import time
import uuid

from .. import prompts
from ..core import atomic
from ..core.atomic import replace_dir
from ..core.errors import InputError
from ..core.notices import progress_bars_wanted
from ..core.paths import TINY_VISION_ALIAS
from ..data.pmc_vqa import ReadStats, read_pmc_vqa_csv
from ..data.sources import resolve_data_files
from ..data.store import EXAMPLES_NAME, REPORT_NAME
from ..format import encoding
from ..format.encoding import NO_HEAD, RowEncoder
from ..models.loading import check_tokenizer, covers_all_text, load_processor, load_tokenizer
from .media import TextMedia, VisionPrep, length_stats

VERIFY_ROWS = 16            # rows per job checked against the per-row apply_chat_template reference
CHUNK = 10_000              # rows per tokenizer call: big batches keep the Rust tokenizer busy
EXAMPLES_PER_SPLIT = 2
SIZE_BOUND = 3.0            # on-disk bytes <= SIZE_BOUND x (tokens x 4 bytes)
OUTPUT_SPLITS = ("train", "test")  # source splits used; v1 `test_full` (test.csv beside test_clean) is not


def features():
    from datasets import Features, List, Value
    tokens = List(Value("int32"))
    return Features({
        "input_ids": tokens, "labels": tokens,
        "source_file": Value("string"), "source_row": Value("int64"),
        "question": Value("string"), "caption": Value("string"),
        "choices": {k: Value("string") for k in prompts.LETTERS},
        "answer_label": Value("string"),
        "truncated": Value("string"),  # "" or what was cut to fit --max_length ("caption", "question")
    })


def parse_val_size(value) -> float | int:
    """`0.05` -> a fraction of train; `500` -> a row count; `0` -> no validation split."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--val_size {value!r}: expected a fraction (0.05) or a row count (500)") from None
    if not math.isfinite(v):  # 'inf' would crash int(), 'nan' would pass every comparison below
        raise InputError(f"--val_size {value!r}: expected a finite fraction (0.05) or a row count (500)")
    if v < 0 or (v >= 1 and v != int(v)):
        raise InputError(f"--val_size {value!r}: expected a fraction in [0, 1) or a whole row count")
    return int(v) if v >= 1 else v


# ---------------------------------------------------------------- output folder (atomic)
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove temp folders left by a killed run; restore a replaced output if the swap was cut."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(p, out)  # killed between the two renames of an --overwrite: put the old one back
        else:
            shutil.rmtree(p, ignore_errors=True)


def _apply_rationales(source, path, missing: str):
    """{id: reasoning} of `--rationales`, and the train rows without one dropped or kept answer-only."""
    if missing not in ("drop", "answer_only"):
        raise InputError(f"--rationale_missing {missing!r}: use drop or answer_only")
    try:
        table = encoding.load_rationales(path)
    except ValueError as e:
        raise InputError(str(e)) from None
    train = source["train"]
    has = [r for r in train if encoding.question_id(r) in table]
    counts = {"file": str(path), "policy": missing, "train_rows": len(train), "with_rationale": len(has),
              "without": len(train) - len(has), "dropped": len(train) - len(has) if missing == "drop" else 0}
    if missing == "drop":
        if not has:
            raise InputError(f"--rationales '{path}': no kept rationale matches a training row")
        source["train"] = has
    return table, counts


def check_output_dir(output_dir, overwrite: bool) -> Path:
    # --overwrite replaces earlier preprocessor output only, never an unrelated folder.
    return atomic.check_output_dir(output_dir, overwrite, REPORT_NAME, "a preprocessor output")


def _drop_unencodable(tok, chunk, skipped):
    """Rows whose question or gold answer text encodes to no tokens at all (a tokenizer without byte
    fallback drops characters outside its vocabulary) would train on an empty question or answer."""
    questions = encoding.batch_ids(tok, [r.question for r in chunk])
    answers = encoding.batch_ids(tok, [r.choices[r.answer_label] for r in chunk])
    out = []
    for rec, q, a in zip(chunk, questions, answers):
        if not q or not a:
            skipped["question_encodes_to_nothing" if not q else "answer_encodes_to_nothing"] += 1
        else:
            out.append(rec)
    return out


def encode_records(enc: RowEncoder, records, max_length, skipped, truncated, desc, progress=True,
                   check_empty=False, extra=None):
    """-> (kept records, prompts as (head, rest) pairs, target id lists); too-long rows counted in
    `skipped`, shortened ones in `truncated`. `check_empty`: also skip rows whose question or answer
    encodes to nothing (needed only for tokenizers that can drop characters). `extra(record)`: tokens the
    row will have beyond its ids (an image placeholder's expansion), counted against `max_length`."""
    from tqdm.auto import tqdm
    if records:
        enc.verify([enc.messages(r) for r in records[:VERIFY_ROWS]])
    kept, P, T = [], [], []
    with tqdm(total=len(records), desc=desc, unit="row",
              disable=not progress_bars_wanted(progress) or len(records) < CHUNK) as bar:
        for start in range(0, len(records), CHUNK):
            chunk = records[start:start + CHUNK]
            n_chunk = len(chunk)
            if check_empty:
                chunk = _drop_unencodable(enc.tok, chunk, skipped)
            ps, ts = enc.encode([enc.messages(r) for r in chunk])
            for rec, p, t in zip(chunk, ps, ts):
                limit = max_length - (extra(rec) if extra is not None else 0)
                if len(p[0]) + len(p[1]) + len(t) > limit:
                    fitted = enc.fit(rec, p, t, limit)
                    if fitted is None:
                        skipped["too_long"] += 1
                        continue
                    rest, t, what = fitted
                    p = (NO_HEAD, rest)
                    truncated[what] += 1
                    rec = dataclasses.replace(rec, truncated=what)
                kept.append(rec)
                P.append(p)
                T.append(t)
            bar.update(n_chunk)
    return kept, P, T


# ---------------------------------------------------------------- Arrow columns
def build_dataset(records, P, T, with_caption=True, media=None):
    """Columns built straight into Arrow arrays (no per-row .map / feature encoding): int32 tokens,
    -100 on the prompt.

    `caption` is stored only when the prompt holds it: v2 captions can be longer than the whole
    tokenized row, and the on-disk size must stay within SIZE_BOUND x token bytes."""
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable
    import numpy as np
    import pyarrow as pa

    lp = np.fromiter((len(h) + len(r) for h, r in P), dtype=np.int64, count=len(P))
    lt = np.fromiter(map(len, T), dtype=np.int64, count=len(T))
    lengths = lp + lt
    offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(chain.from_iterable(x for (h, r), t in zip(P, T) for x in (h, r, t)),
                      dtype=np.int32, count=total)
    # A token is a prompt token when its position inside its row is < that row's prompt length.
    row = np.repeat(np.arange(len(records)), lengths)
    in_prompt = (np.arange(total) - offsets[:-1][row]) < lp[row]
    labels = np.where(in_prompt, np.int32(encoding.IGNORE_INDEX), ids).astype(np.int32)
    pa_off = pa.array(offsets, type=pa.int32())
    string = pa.string()
    choices = pa.StructArray.from_arrays(
        [pa.array([r.choices.get(k) for r in records], string) for k in prompts.LETTERS],
        names=list(prompts.LETTERS))
    feats = features()
    columns = {
        "input_ids": pa.ListArray.from_arrays(pa_off, pa.array(ids)),
        "labels": pa.ListArray.from_arrays(pa_off, pa.array(labels)),
        "source_file": pa.array([r.source_file for r in records], string),
        "source_row": pa.array([r.source_row for r in records], pa.int64()),
        "question": pa.array([r.question for r in records], string),
        "caption": pa.array([(r.caption or "") if with_caption else "" for r in records], string),
        "choices": choices,
        "answer_label": pa.array([r.answer_label for r in records], string),
        "truncated": pa.array([r.truncated for r in records], string),
    }
    if media is not None:  # image models: image, image_width, image_height (media.py)
        media.add_columns(feats, columns, records)
    table = pa.Table.from_arrays([columns[c] for c in feats], schema=feats.arrow_schema)
    # An explicit fingerprint: otherwise datasets hashes the whole table (seconds at 177k rows).
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=feats), fingerprint=uuid.uuid4().hex)


def _split_validation(n: int, val_size, seed: int):
    import numpy as np
    n_val = val_size if isinstance(val_size, int) else (max(1, round(n * val_size)) if val_size > 0 else 0)
    if n_val and n_val >= n:
        raise InputError(f"--val_size {val_size} leaves no training rows ({n} train rows kept)")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def _examples(tok, split, records, P, T, n=EXAMPLES_PER_SPLIT):
    out = []
    for rec, (h, r), t in islice(zip(records, P, T), n):
        p = h + r
        ids, labels = p + t, [encoding.IGNORE_INDEX] * len(p) + t
        out.append({"split": split, "source_file": rec.source_file, "source_row": rec.source_row,
                    "answer_label": rec.answer_label,
                    "prompt": tok.decode(p, skip_special_tokens=False),
                    "target": tok.decode(t, skip_special_tokens=False),
                    "mask": encoding.visualize_mask(tok, ids, labels), "input_ids": ids, "labels": labels})
    return out


def _save(dsd, path: Path, num_proc, progress: bool) -> None:
    import datasets
    was_on = datasets.is_progress_bar_enabled()
    if not progress_bars_wanted(progress):
        datasets.disable_progress_bars()
    try:
        dsd.save_to_disk(str(path), num_proc=num_proc if num_proc and num_proc > 1 else None)
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- the job
def _gc_paused(fn):
    """Run with the cyclic GC off: the millions of token lists built here hold no cycles, yet each GC
    pass rescans them all (about 20 % of a 177k-row run)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_on = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_on:
                gc.enable()
    return wrapper


@_gc_paused
def run_preprocess(data, tokenizer_name, output_dir, max_length=1024, max_samples=None, val_size=0.05,
                   overwrite=False, num_proc=1, system_prompt=None, reasoning=False, include_caption=False,
                   seed=42, tokenizer=None, progress=True, vision=None, rationales=None,
                   rationale_missing="drop") -> dict:
    """Preprocess PMC-VQA for SFT; returns the report (also written to `<output_dir>/preprocess_report.json`).

    `system_prompt=None` uses `prompts.SYSTEM_PROMPT` (None by default: no system message); `""` forces
    none. `max_samples` keeps the first N rows of each source split (train, test) before encoding.
    `val_size`: a fraction of train or a row count (0: no validation split). `tokenizer`: an already
    loaded tokenizer (then `tokenizer_name` is only recorded). `vision`: a `media.VisionPrep`
    for image-text models (figures checked, image prompts, image columns; see docs/VISION.md).
    """
    t0 = time.perf_counter()
    stages, mark = {}, [t0]

    def lap(name):  # seconds per stage, for the report and the benchmark
        now = time.perf_counter()
        stages[name] = round(now - mark[0], 3)
        mark[0] = now
    args = dict(data=str(data), tokenizer=str(tokenizer_name), output_dir=str(output_dir),
                max_length=max_length, max_samples=max_samples, val_size=val_size, overwrite=overwrite,
                num_proc=num_proc, system_prompt=system_prompt, reasoning=bool(reasoning),
                include_caption=bool(include_caption), seed=seed)
    if int(max_length) < 16:
        raise InputError(f"--max_length {max_length}: too small (at least 16 tokens)")
    if max_samples is not None and int(max_samples) < 1:
        raise InputError(f"--max_samples {max_samples}: must be at least 1")
    val_size = args["val_size"] = parse_val_size(val_size)
    out = check_output_dir(output_dir, overwrite)
    _clean_stale(out)
    sys_prompt = prompts.SYSTEM_PROMPT if system_prompt is None else (system_prompt or None)

    # Data first: a bad CSV is reported in a second, before the (slower) tokenizer load.
    files = resolve_data_files(data)
    stats, source = ReadStats(), {}
    for split in OUTPUT_SPLITS:
        recs = []
        for path in files.get(split, []):
            recs.extend(read_pmc_vqa_csv(path, stats)[0])
        if recs:
            source[split] = recs
    if "train" not in source:
        raise InputError(f"--data '{data}': no usable training rows (skipped: {dict(stats.skipped)})")
    lap("read")
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_name)
    else:
        check_tokenizer(tokenizer, tokenizer_name)
    encoding.ensure_chat_template(tokenizer)
    # Rows over the model's length are shortened or skipped below (counted in the report), so the
    # tokenizer's "sequence length is longer than the specified maximum" warning says nothing true here.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    plain_template = tokenizer.chat_template == encoding.PLAIN_CHAT_TEMPLATE
    lap("tokenizer")
    unused = 0
    if max_samples:
        for split, recs in source.items():
            unused += max(0, len(recs) - int(max_samples))
            source[split] = recs[:int(max_samples)]

    from collections import Counter
    media = vision if vision is not None else TextMedia()  # the one text-or-image decision of this stage
    enc = media.row_encoder(tokenizer, sys_prompt, reasoning, include_caption)
    rationale_counts = None
    if rationales:  # sampled reasoning (evaluate.rationales) in the train targets; see docs/REASONING.md
        enc.rationales, rationale_counts = _apply_rationales(source, rationales, rationale_missing)
    check_empty = not covers_all_text(tokenizer)
    skipped, truncated, encoded = Counter(stats.skipped), Counter(), {}
    # image rows whose figure is missing or bad are dropped here, counted by reason
    source = media.check(source, data, skipped, progress)
    for split, recs in source.items():
        encoded[split] = encode_records(enc, recs, int(max_length), skipped, truncated, f"tokenizing {split}",
                                        progress, check_empty, extra=media.extra_tokens)
    if not encoded["train"][0]:
        why = {k: v for k, v in skipped.items() if k not in stats.skipped}
        raise InputError(f"no training row left for --tokenizer '{tokenizer_name}' and --max_length "
                         f"{max_length} (skipped: {why})")
    lap("encode")
    recs, P, T = encoded.pop("train")
    tr, va = _split_validation(len(recs), val_size, seed)
    parts = {"train": ([recs[i] for i in tr], [P[i] for i in tr], [T[i] for i in tr])}
    if va:
        parts["validation"] = ([recs[i] for i in va], [P[i] for i in va], [T[i] for i in va])
    if "test" in encoded:
        parts["test"] = encoded["test"]

    from datasets import DatasetDict
    dsd = DatasetDict({s: build_dataset(*v, with_caption=include_caption, media=media) for s, v in parts.items()})
    all_p = [len(h) + len(r) for _, P_, _ in parts.values() for h, r in P_]
    all_t = [len(t) for _, _, T_ in parts.values() for t in T_]
    tokens = sum(all_p) + sum(all_t)
    lap("build")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.make_temp_dir(f".{out.name}.tmp-{os.getpid()}-", out.parent)  # 0755, not mkdtemp's 0700
    except OSError as exc:
        raise InputError(f"cannot write beside --output_dir '{out}': {exc.strerror or exc}") from None
    try:
        _save(dsd, tmp, num_proc, progress)
        lap("save")
        disk = _dir_bytes(tmp)
        kept = sum(len(v[0]) for v in parts.values())
        wall = time.perf_counter() - t0
        report = {
            "model_kind": media.kind,
            "args": args,
            "tokenizer": str(tokenizer_name),
            "tokenizer_path": str(getattr(tokenizer, "name_or_path", "")),
            "template_hash": encoding.template_hash(tokenizer),
            "tokenizer_hash": encoding.tokenizer_hash(tokenizer),  # vocab + merges: training refuses another
            "chat_template": "plain (encoding.PLAIN_CHAT_TEMPLATE)" if plain_template else "tokenizer's own",
            "system_prompt": sys_prompt, "reasoning": "brief" if reasoning else "none",
            "include_caption": bool(include_caption), "rationales": rationale_counts,
            "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "files": {s: [str(p) for p in ps] for s, ps in files.items()},
            "ignored_files": {s: [str(p) for p in ps] for s, ps in files.items() if s not in OUTPUT_SPLITS},
            "rows_read": stats.rows_read, "kept": kept, "skipped": dict(sorted(skipped.items())),
            "unused_by_max_samples": unused,
            "label_text_mismatch": stats.label_text_mismatch, "resolved_from_text": stats.resolved_from_text,
            "duplicate_distractors": stats.duplicate_distractors,
            "truncated": dict(sorted(truncated.items())),
            "splits": {s: len(v[0]) for s, v in parts.items()},
            "token_lengths": {"prompt": length_stats(all_p), "target": length_stats(all_t),
                              "total": length_stats([a + b for a, b in zip(all_p, all_t)])},
            "tokens": tokens, "max_length": int(max_length),
            "disk_bytes": disk, "token_bytes": tokens * 4, "disk_ratio": round(disk / max(1, tokens * 4), 3),
            "disk_ratio_bound": SIZE_BOUND, "disk_ratio_ok": disk <= SIZE_BOUND * tokens * 4,
            "prefix_cache": {"batches": enc.fast.prefix_batches, "exact": enc.fast.prefix_exact},
            "verified_rows": min(VERIFY_ROWS, len(source["train"])) + min(VERIFY_ROWS, len(source.get("test", []))),
            "stage_s": stages, "wall_s": round(wall, 3), "rows_per_s": round(stats.rows_read / max(wall, 1e-9), 1),
            "versions": _versions(), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }
        report.update(media.report(parts))
        examples = [e for s, v in parts.items() for e in _examples(tokenizer, s, *v)]
        (tmp / EXAMPLES_NAME).write_text(json.dumps(examples, indent=2, ensure_ascii=False))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        check_output_dir(output_dir, overwrite)  # someone may have created it meanwhile
        replace_dir(tmp, out)
    except Exception as exc:  # a full disk: one line (the temp folder goes below; an earlier output stays)
        raise atomic.disk_full_error(exc, out, needed=tokens * 8, hint=" (the Arrow files take about 8 bytes "
                                     "per token)") or exc from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _versions() -> dict:
    import datasets
    import tokenizers
    import transformers
    return {"datasets": datasets.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def vision_args(images, tokenizer_name: str, max_pixels, output_dir, overwrite):
    """The script's --images / --max_pixels / --tokenizer -> (tokenizer or None, VisionPrep or None).

    Checked before anything is loaded: --max_pixels needs --images; the output folder rule first, so a
    refused overwrite costs no model download."""
    if images is None:
        if max_pixels is not None:
            raise InputError("--max_pixels needs --images (it sets how many tokens a figure becomes)")
        if tokenizer_name == TINY_VISION_ALIAS:  # text-only rows for the tiny image model's tokenizer
            return load_processor(tokenizer_name).tokenizer, None
        return None, None
    check_output_dir(output_dir, overwrite)
    processor = load_processor(tokenizer_name)
    return processor.tokenizer, VisionPrep(images, processor, max_pixels)
