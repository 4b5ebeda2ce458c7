"""Reading and validating PMC-VQA CSVs (v1 and v2); `sources.py` locates them (file, folder or Hub).

Two schemas (docs/PREPROCESSING.md):
    v1  Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label
        `Answer` is the choice TEXT, `Answer_label` the letter.
    v2  index,Figure_path,Caption,Question,Choice A,Choice B,Choice C,Choice D,Answer,split
        `Answer` is the LETTER; `Caption` is the figure caption.

`read_pmc_vqa_csv` returns `MCQRecord`s plus `ReadStats`; rows that cannot be used are skipped and
counted under a short reason (`empty_question`, `fewer_than_2_choices`, `invalid_label`,
`duplicate_choices`: the gold answer's text is also another choice's text, so no letter is right alone).
Rows kept although two wrong choices share a text are counted in `duplicate_distractors`. Input that
cannot be read at all raises `InputError` (one line, naming file / row / column).

Rows are CSV records as the parser counts them (quoted fields may span lines; blank lines are not
rows). `source_row` is the 0-based data row (the header is not a row), the same number `where()` uses.
Rows with fewer fields than the header are padded with empty cells (pandas' behaviour).
"""
from __future__ import annotations

from collections import Counter
import csv
from dataclasses import dataclass, field
import gc
import io
from pathlib import Path
import re

from ..core.errors import InputError, where
from ..prompts import LETTERS  # the one definition of the choice letters

CHOICE_COLUMNS = tuple(f"Choice {x}" for x in LETTERS)
V1_COLUMNS = ("Figure_path", "Question", "Answer", *CHOICE_COLUMNS, "Answer_label")
V2_COLUMNS = ("index", "Figure_path", "Caption", "Question", *CHOICE_COLUMNS, "Answer", "split")
# Columns the reader actually needs (v2's `index` and `split` are optional).
_V2_NEEDED = ("Figure_path", "Caption", "Question", *CHOICE_COLUMNS, "Answer")

# Space-like characters -> ' ' (zero-width ones included, as asked); soft hyphen dropped.
_SPACES = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
          "\u200b\u200c\u200d\u2028\u2029\u202f\u205f\u2060\u3000\ufeff"
_TRANSLATE = {ord(c): " " for c in _SPACES}
_TRANSLATE[0x00AD] = None
_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_LABEL_RE = re.compile(r"^([A-Da-d])\s*(?:[:.)]\s*(.*))?$", re.S)
_ANY_PREFIX_RE = re.compile(r"^[A-D]\s*:\s*")
_LETTER_SET = frozenset(LETTERS)


@dataclass
class MCQRecord:
    """One multiple-choice question. `choices` keeps the file's letters (a gap such as A, B, D is
    possible when a middle cell is empty); `answer_label` is one of its keys."""
    source_file: str
    source_row: int
    question: str
    choices: dict[str, str]
    answer_label: str
    caption: str | None  # None for v1; the cleaned caption (maybe "") for v2
    figure_path: str
    truncated: str = ""  # set by preprocessing: "caption" / "question" when it cut that to fit


@dataclass
class ReadStats:
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    label_text_mismatch: int = 0  # kept, the label won over a disagreeing answer text
    resolved_from_text: int = 0   # invalid label, gold letter found from the answer text
    duplicate_distractors: int = 0  # kept, but two wrong choices have the same text (gold text unique)

    def to_dict(self) -> dict:
        return {"rows_read": self.rows_read, "kept": self.kept,
                "skipped": dict(sorted(self.skipped.items())),
                "label_text_mismatch": self.label_text_mismatch,
                "resolved_from_text": self.resolved_from_text,
                "duplicate_distractors": self.duplicate_distractors}

    def merge(self, other: "ReadStats") -> "ReadStats":
        """Add `other` into self (in place) and return self."""
        self.rows_read += other.rows_read
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.label_text_mismatch += other.label_text_mismatch
        self.resolved_from_text += other.resolved_from_text
        self.duplicate_distractors += other.duplicate_distractors
        return self


# ---------------------------------------------------------------- cell cleaning
def clean_cell(s: str) -> str:
    """Odd spaces -> ' ', whitespace runs (newlines too) collapsed, stray wrapping quotes removed."""
    if not s.isascii():
        s = s.translate(_TRANSLATE)
    s = " ".join(s.split())
    if s[:1] in _QUOTE_PAIRS:
        s = _strip_quotes(s)
    return s


def _strip_quotes(s: str) -> str:
    # Only a matching pair around the whole cell, and only when no such quote is inside:
    # '"Red"' -> 'Red', but '"a" or "b"' stays.
    while len(s) >= 2 and s[0] in _QUOTE_PAIRS and s[-1] == _QUOTE_PAIRS[s[0]]:
        inner = s[1:-1]
        if s[0] in inner or s[-1] in inner:
            break
        s = inner.strip()
    return s


def clean_choice(s: str, letter: str) -> str:
    """Clean a choice cell and strip its OWN prefix once: ' B: Red ' in column B -> 'Red';
    'A:B:cell lymphoma' in column A -> 'B:cell lymphoma'; 'A:x' in column B stays 'A:x'."""
    if not s.isascii():
        s = s.translate(_TRANSLATE)
    s = " ".join(s.split())
    if s[:1] in _QUOTE_PAIRS:
        s = _strip_quotes(s)
    if s[:1] == letter:
        rest = s[1:].lstrip(" ")
        if rest[:1] == ":":
            s = rest[1:].lstrip(" ")
            if s[:1] in _QUOTE_PAIRS:
                s = _strip_quotes(s)
    return s


def _norm(s: str) -> str:
    return " ".join(s.casefold().split())


def _answer_forms(answer: str) -> set[str]:
    forms = {_norm(answer)}
    bare = _ANY_PREFIX_RE.sub("", answer, count=1)
    if bare != answer:
        forms.add(_norm(_strip_quotes(bare)))
    return forms


def parse_label(s: str) -> tuple[str | None, str]:
    """'B', ' b ', '"B"', 'B:', 'B: Red' -> ('B', text-after-letter); anything else -> (None, '')."""
    if s in _LETTER_SET:
        return s, ""
    s = clean_cell(s).strip(_QUOTES + " ")
    m = _LABEL_RE.match(s)
    if not m:
        return None, ""
    return m.group(1).upper(), (m.group(2) or "").strip()


# ---------------------------------------------------------------- reading
def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{where(path)}: no such file")
    if path.is_dir():
        raise InputError(f"{where(path)}: is a directory, expected a PMC-VQA CSV file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as exc:
        raise InputError(f"{where(path)}: cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise InputError(f"{where(path)}: empty file (0 bytes), expected a PMC-VQA CSV")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"{where(path)}: UTF-16 text (a UTF-16 byte-order mark); re-save the file as UTF-8")
    if b"\x00" in head:
        raise InputError(f"{where(path)}: not a CSV file (binary data, e.g. an image or archive)")


def _csv_records(text: str):
    """Yield (data_row, physical_line_after_record, fields) like pandas counts rows: the header is
    skipped, blank lines are not rows."""
    reader = csv.reader(io.StringIO(text, newline=""))
    n = -1
    for fields in reader:
        if not fields:
            continue
        yield n, reader.line_num, fields
        n += 1


def _utf8_error(path: Path) -> InputError:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        return InputError(f"{where(path)}: not UTF-8 text")
    except UnicodeDecodeError as exc:
        offset, bad = exc.start, raw[exc.start:exc.start + 1]
    line = raw.count(b"\n", 0, offset) + 1
    # Row = the CSV record (header excluded) that contains the bad byte's line, counted by a CSV
    # parser over the text decoded with replacement characters.
    row = None
    for r, end_line, _ in _csv_records(raw.decode("utf-8", errors="replace")):
        if end_line >= line:
            row = r
            break
    if row is None or row < 0:
        return InputError(f"{where(path)}: not UTF-8: byte {bad!r} at byte offset {offset} in the "
                          f"header (line {line}); re-save the file as UTF-8")
    return InputError(f"{where(path, row)}: not UTF-8: byte {bad!r} at byte offset {offset} (physical "
                      f"line {line}; the row is the 0-based data row counted by a CSV parser); "
                      f"re-save the file as UTF-8")


def _ragged_error(path: Path, pandas_msg: str = "") -> InputError:
    """Find the first record with more fields than the header (CSV parser count)."""
    try:
        text = path.read_text(encoding="utf-8")
        ncols = None
        for r, _, fields in _csv_records(text):
            if ncols is None:
                ncols = len(fields)
            elif len(fields) > ncols:
                return InputError(f"{where(path, r)}: {len(fields)} fields but the header has "
                                  f"{ncols} (a stray comma or an unquoted field?)")
    except (csv.Error, UnicodeDecodeError):
        pass
    msg = " ".join(pandas_msg.split()).replace("Error tokenizing data. C error: ", "")
    what = "cannot parse the CSV"
    m = re.search(r"in line (\d+)", msg)  # pandas counts records from 1, header included
    if m:
        what = f"cannot parse the CSV at data row {int(m.group(1)) - 2}"
    m = re.search(r"starting at row (\d+)", msg)  # pandas counts records from 0, header included
    if m:
        what = f"cannot parse the CSV: an unclosed quote opens in data row {int(m.group(1)) - 1}"
    return InputError(f"{where(path)}: {what} (pandas: {msg or 'more fields than the header'})")


def _read_frame(path: Path):
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, engine="c", encoding="utf-8",
                         skip_blank_lines=True)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{where(path)}: empty file (no header, no data rows)") from None
    except pd.errors.ParserError as exc:
        raise _ragged_error(path, str(exc)) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{where(path)}: cannot read the CSV ({' '.join(str(exc).split())})") from None
    if not isinstance(df.index, pd.RangeIndex):
        # Every row had more fields than the header: pandas made the extras an index.
        raise _ragged_error(path)
    return df


def _detect_schema(path: Path, columns: list[str]) -> tuple[str, dict[str, str]]:
    """Return (version, {canonical column: column in the frame})."""
    found = {}
    for c in columns:
        key = clean_cell(str(c))
        found.setdefault(key, c)
        found.setdefault(key.casefold(), c)
    def lookup(names):
        got = {n: found.get(n, found.get(n.casefold())) for n in names}
        return {n: c for n, c in got.items() if c is not None}, [n for n, c in got.items() if c is None]
    m1, miss1 = lookup(V1_COLUMNS)
    m2, miss2 = lookup(_V2_NEEDED)
    if not miss1:
        return "1", m1
    if not miss2:
        return "2", m2
    shown = ", ".join(repr(clean_cell(str(c)))[:60] for c in columns[:12]) + (" ..." if len(columns) > 12 else "")
    near = "v1" if len(miss1) <= len(miss2) else "v2"
    missing = miss1 if near == "v1" else miss2
    raise InputError(
        f"{where(path)}: not a PMC-VQA CSV: missing column(s) {', '.join(map(repr, missing))} "
        f"(closest: {near}); expected v1 header {','.join(V1_COLUMNS)} or v2 header "
        f"{','.join(V2_COLUMNS)}; found {len(columns)} column(s): {shown}")


def read_pmc_vqa_csv(path, stats: ReadStats | None = None) -> tuple[list[MCQRecord], ReadStats]:
    """Read one PMC-VQA CSV (v1 or v2, detected from the header) into records.

    Every cell is cleaned (`clean_cell`); choice cells lose their own letter prefix (`clean_choice`).
    v1 gold letter: a valid `Answer_label` pointing at a present choice wins (a disagreeing `Answer`
    text is counted in `label_text_mismatch`); otherwise the `Answer` text decides if exactly one
    choice matches it (`resolved_from_text`), else the row is skipped as `invalid_label`.
    v2 gold letter: `Answer` ('B', ' "B" ', 'B:'); invalid -> `invalid_label`.
    `stats`, if given, is updated in place (merged) and returned.
    """
    path = Path(path)
    _check_path(path)
    df = _read_frame(path)
    version, cols = _detect_schema(path, list(df.columns))
    if len(df) == 0:
        raise InputError(f"{where(path)}: no data rows (header only)")
    name = path.name
    mine = ReadStats(rows_read=len(df))
    records: list[MCQRecord] = []
    col = lambda c: df[cols[c]].tolist()  # noqa: E731
    questions, figures = col("Question"), col("Figure_path")
    choice_cols = [col(c) for c in CHOICE_COLUMNS]
    answers = col("Answer")
    labels = col("Answer_label") if version == "1" else None
    captions = col("Caption") if version == "2" else [None] * len(df)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # 177k new records + dicts trigger costly full collections; nothing cyclic here
    try:
        _validate_rows(records, mine, version, name, questions, figures, captions, choice_cols,
                       answers, labels)
    finally:
        if gc_was_enabled:
            gc.enable()
    mine.kept = len(records)
    if stats is not None:
        stats.merge(mine)
        return records, stats
    return records, mine


def _validate_rows(records, mine, version, name, questions, figures, captions, choice_cols,
                   answers, labels) -> None:
    skipped = mine.skipped
    for i, (q, fig, cap, a, b, c, d, ans) in enumerate(
            zip(questions, figures, captions, *choice_cols, answers)):
        q = clean_cell(q)
        if not q:
            skipped["empty_question"] += 1
            continue
        choices = {}
        for letter, cell in (("A", a), ("B", b), ("C", c), ("D", d)):
            if cell:
                t = clean_choice(cell, letter)
                if t:
                    choices[letter] = t
        if len(choices) < 2:
            skipped["fewer_than_2_choices"] += 1
            continue
        if version == "1":
            gold, _ = parse_label(labels[i])
            ans_text = clean_cell(ans)
        else:
            gold, ans_text = parse_label(ans)
        mismatch = resolved = False
        if gold is not None and gold in choices:
            mismatch = bool(ans_text and ans_text != choices[gold]
                            and _norm(choices[gold]) not in _answer_forms(ans_text))
        elif version == "1" and ans_text:
            forms = _answer_forms(ans_text)
            hits = [k for k, v in choices.items() if _norm(v) in forms]
            if len(hits) != 1:
                skipped["invalid_label"] += 1
                continue
            gold, resolved = hits[0], True
        else:
            skipped["invalid_label"] += 1
            continue
        texts = [_norm(v) for v in choices.values()]
        if len(set(texts)) < len(texts):
            if texts.count(_norm(choices[gold])) > 1:  # `A:MRI,B:MRI` with gold A: B is as right as A
                skipped["duplicate_choices"] += 1
                continue
            mine.duplicate_distractors += 1
        mine.label_text_mismatch += mismatch
        mine.resolved_from_text += resolved
        records.append(MCQRecord(
            source_file=name, source_row=i, question=q, choices=choices, answer_label=gold,
            caption=None if cap is None else clean_cell(cap), figure_path=clean_cell(fig)))
