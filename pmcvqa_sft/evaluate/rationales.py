"""Rejection-sampled rationales: sample up to K completions per question, keep the first that is strictly
right (`metrics.generated_prediction(...)["pred"] == gold`, the evaluation's own reader), and write one
JSONL line per question attempted, kept or not.

The file is append-only and resumable: each line is written with flush + fsync; on restart a torn last
line (a kill -9 mid-write) is cut off and the ids already written are skipped, so nothing is lost or
written twice. Samplers: `local_sampler` (batched `generation.generate_ids` with do_sample) and
`endpoint.endpoint_sampler` (an OpenAI-compatible server). Preprocessing reads the kept reasoning with
`--rationales FILE.jsonl` (format.encoding.load_rationales).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from .. import prompts
from ..core.errors import InputError
from ..format.encoding import assistant_turn, question_id
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


def split_reasoning(raw: str, gold: str, choices: dict) -> str:
    """The reasoning of a strictly right turn: the think block's text (models with think tokens), else the
    plain text before the answer line (Qwen2.5-VL)."""
    if prompts.THINK_CLOSE in raw:
        body = raw.split(prompts.THINK_CLOSE, 1)[0]
        body = body[len(prompts.THINK_OPEN):] if body.startswith(prompts.THINK_OPEN) else body
        return body[:-1] if body.endswith("\n") else body  # assistant_content writes that "\n" back
    line = prompts.answer_line(gold, choices[gold])
    return raw[:raw.rfind(line)].strip() if line in raw else ""


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


def local_sampler(model, tokenizer, settings, k: int) -> Callable[[dict], Iterable[Sample]]:
    """K samples of one question in one batch from the row's stored prompt (generation.generate_ids)."""
    from ..infer.generation import generate_ids

    def sample(row):
        enc = row["prompt_ids"]
        tail = tokenizer.decode(enc[-8:], skip_special_tokens=False)
        for g in generate_ids(model, tokenizer, [enc] * k, settings):
            yield Sample(assistant_turn(tail, g.text), g.token_ids, g.finished, g.text)
    return sample


def sample_rationales(rows, sampler, out_path, k: int, teacher: str, settings: dict, progress=None) -> dict:
    """Attempt each row not yet in `out_path`; returns the report over the whole file."""
    log = JsonlLog(out_path)
    for row in rows:
        qid = question_id(row)
        if qid in log.done:
            continue
        gold, choices = row["answer_label"], row["choices"]
        rec = {"id": qid, "kept": False, "reasoning": None, "answer_line": None, "attempts": 0,
               "completion_tokens": None, "failure": None, "teacher": teacher, "settings": settings}
        try:
            for s in sampler(row):
                rec["attempts"] += 1
                pred = generated_prediction(s.raw, choices, s, 0)
                if pred["pred"] == gold:
                    rec.update(kept=True, reasoning=split_reasoning(s.raw, gold, choices),
                               answer_line=prompts.answer_line(gold, choices[gold]),
                               completion_tokens=len(s.token_ids))
                    break
                if rec["attempts"] >= k:
                    break
        except EndpointFailure as e:
            rec["failure"] = e.name
        log.append(rec)
        if progress:
            progress(rec)
    return rationale_report(log.done.values(), k)


def rationale_report(records, k: int) -> dict:
    recs = list(records)
    kept = [r for r in recs if r["kept"]]
    by_attempt = Counter(r["attempts"] for r in kept)
    return {"questions": len(recs), "kept": len(kept), "kept_pct": 100 * len(kept) / len(recs) if recs else 0.0,
            "success_by_attempt": {str(a): by_attempt.get(a, 0) for a in range(1, k + 1)},
            "mean_completion_tokens": (sum(r["completion_tokens"] for r in kept) / len(kept)) if kept else None,
            "questions_with_none": len(recs) - len(kept),
            "failures": dict(Counter(r["failure"] for r in recs if r.get("failure")))}


def format_rationale_report(rep: dict) -> str:
    lines = [f"rationales: {rep['kept']}/{rep['questions']} questions kept ({rep['kept_pct']:.1f} %)",
             "success by attempt: " + ", ".join(f"#{a}: {n}" for a, n in rep["success_by_attempt"].items()),
             f"mean completion tokens of the kept samples (reasoning + answer line): {rep['mean_completion_tokens']}",
             f"questions with none: {rep['questions_with_none']}"]
    if rep["failures"]:
        lines.append("endpoint failures: " + ", ".join(f"{k}: {v}" for k, v in rep["failures"].items()))
    return "\n".join(lines)
