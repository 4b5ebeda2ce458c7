"""Rejection-sampled rationales: sample up to K completions per question, keep the first that is strictly
right (`metrics.generated_prediction(...)["pred"] == gold`, the evaluation's own reader), and write one
JSONL line per question attempted, kept or not.

The file is append-only and resumable: each line is written with flush + fsync; on restart a torn last
line (a kill -9 mid-write) is cut off and the ids already written are skipped, so nothing is lost or
written twice. Samplers: `local_sampler` (K samples of a question in one batch through
`accuracy.generate_turns`, the generation of `--evaluate --method generate`: text models and image models,
the figure with each sample) and `endpoint.endpoint_sampler` (an OpenAI-compatible server). The report
(printed, and OUT.report.json beside the file) gives kept %, success by attempt and the mean reasoning
tokens of the kept samples, counted with the model's tokenizer (local) or the dataset's (endpoint).
Preprocessing reads the kept reasoning with `--rationales FILE.jsonl` (format.encoding.load_rationales).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from .. import prompts
from ..core.atomic import write_json
from ..core.errors import InputError
from ..format.answers import reasoning_text
from ..format.encoding import question_id
from .metrics import generated_prediction


class JsonlLog:
    """Append-only JSONL with fsync per line; `done` holds the ids already written."""

    def __init__(self, path):
        self.path = Path(path)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):  # a torn last line: drop it (its question is redone)
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
                    f.flush()
                    os.fsync(f.fileno())
            for n, line in enumerate(data[:cut].decode("utf-8").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    self.done[rec["id"]] = rec
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{self.path} line {n}: not a rationale record (JSON with an 'id')") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[rec["id"]] = rec


class Sample:
    """One completion: the whole assistant turn, its new token count, whether it reached EOS."""

    def __init__(self, raw: str, token_ids, finished: bool, text: str | None = None):
        self.raw, self.token_ids, self.finished = raw, list(token_ids), finished
        self.text = raw if text is None else text


class EndpointFailure(Exception):
    """An endpoint request that failed after its retries; `name` is the reason shown in the report."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def local_sampler(model, tokenizer, settings, k: int, collator=None) -> Callable[[dict], Iterable[Sample]]:
    """K samples of one question in one batch from the row's stored prompt, with its figure for an image
    model (`collator`): `accuracy.generate_turns`, as `--evaluate --method generate` runs."""
    from .accuracy import generate_turns

    def sample(row):
        for raw, g in generate_turns(model, tokenizer, [row["prompt_ids"]] * k, settings, collator,
                                     [row.get("image")] * k):
            yield Sample(raw, g.token_ids, g.finished, g.text)
    return sample


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of a reasoning `text` alone (`answers.reasoning_text`, stripped; no special tokens added), as
    the evaluation's `mean_reasoning_tokens` counts them."""
    text = text.strip()
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def sample_rationales(rows, sampler, out_path, k: int, teacher: str, settings: dict, tokenizer=None,
                      tokenizer_name: str | None = None, progress=None) -> dict:
    """Attempt each row not yet in `out_path`; returns the report over the whole file, also written
    (atomically) to OUT.report.json. `tokenizer` (named `tokenizer_name` in the report) counts the kept
    reasoning's tokens; without one they are not counted."""
    log = JsonlLog(out_path)
    for row in rows:
        qid = question_id(row)
        if qid in log.done:
            continue
        gold, choices = row["answer_label"], row["choices"]
        rec = {"id": qid, "kept": False, "reasoning": None, "answer_line": None, "attempts": 0,
               "reasoning_tokens": None, "completion_tokens": None, "failure": None, "teacher": teacher,
               "settings": settings}
        try:
            for s in sampler(row):
                rec["attempts"] += 1
                pred = generated_prediction(s.raw, choices, s, 0)
                if pred["pred"] == gold:
                    why = reasoning_text(s.raw)
                    rec.update(kept=True, reasoning=why, answer_line=prompts.answer_line(gold, choices[gold]),
                               reasoning_tokens=count_tokens(tokenizer, why) if tokenizer is not None else None,
                               completion_tokens=len(s.token_ids))
                    break
                if rec["attempts"] >= k:
                    break
        except EndpointFailure as e:
            rec["failure"] = e.name
        log.append(rec)
        if progress:
            progress(rec)
    rep = rationale_report(log.done.values(), k, tokenizer, tokenizer_name)
    write_json(report_path(out_path), rep)
    return rep


def report_path(out_path) -> Path:
    """OUT.jsonl -> OUT.report.json beside it."""
    out = Path(out_path)
    return out.with_name(out.name.removesuffix(".jsonl") + ".report.json")


def rationale_report(records, k: int, tokenizer=None, tokenizer_name: str | None = None) -> dict:
    """kept %, success by attempt, mean reasoning tokens of the kept samples (the think block's text, or
    the text before the answer line, counted with `tokenizer`; records written before the count existed
    are counted now), mean completion tokens (reasoning + answer line, as generated or as the endpoint's
    usage reported them), questions with none, named endpoint failures."""
    recs = list(records)
    kept = [r for r in recs if r["kept"]]
    by_attempt = Counter(r["attempts"] for r in kept)
    why = [r["reasoning_tokens"] if r.get("reasoning_tokens") is not None
           else count_tokens(tokenizer, r["reasoning"] or "") if tokenizer is not None else None for r in kept]
    why = [n for n in why if n is not None]
    done = [r["completion_tokens"] for r in kept if r.get("completion_tokens") is not None]
    return {"questions": len(recs), "kept": len(kept), "kept_pct": 100 * len(kept) / len(recs) if recs else 0.0,
            "success_by_attempt": {str(a): by_attempt.get(a, 0) for a in range(1, k + 1)},
            "mean_reasoning_tokens": sum(why) / len(why) if why else None,
            "reasoning_tokens_counted_with": tokenizer_name if tokenizer is not None else None,
            "mean_completion_tokens": sum(done) / len(done) if done else None,
            "questions_with_none": len(recs) - len(kept),
            "failures": dict(Counter(r["failure"] for r in recs if r.get("failure")))}


def _mean(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_rationale_report(rep: dict) -> str:
    counted = rep["reasoning_tokens_counted_with"]
    lines = [f"rationales: {rep['kept']}/{rep['questions']} questions kept ({rep['kept_pct']:.1f} %)",
             "success by attempt: " + ", ".join(f"#{a}: {n}" for a, n in rep["success_by_attempt"].items()),
             f"mean reasoning tokens of the kept samples (the think block, or the text before the answer line; "
             f"{f'counted with the tokenizer of {counted}' if counted else 'not counted: no tokenizer'}): "
             f"{_mean(rep['mean_reasoning_tokens'])}",
             f"mean completion tokens of the kept samples (reasoning + answer line): "
             f"{_mean(rep['mean_completion_tokens'])}",
             f"questions with none: {rep['questions_with_none']}"]
    if rep["failures"]:
        lines.append("endpoint failures: " + ", ".join(f"{k}: {v}" for k, v in rep["failures"].items()))
    return "\n".join(lines)
