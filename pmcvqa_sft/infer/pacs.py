"""Questions about images in a PACS (DICOMweb): search -> retrieve -> window -> answer -> SR -> JSONL.

    run(args) with inference_example.py's --pacs flags (docs/PACS.md)

One instance (--study/--series/--instance naming exactly what to ask about): the answer is printed and a
failure is a one-line error. The batch form (--pacs_out FILE.jsonl) answers the same question for every
instance matching the search and appends one JSON line per instance (answer or error, flushed and
fsynced as it goes); instances already answered in that file for the same question are skipped, so a
killed run resumes. Every line and message names UIDs only, never a patient value.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import InputError
from ..data import pacs as pacs_mod
from ..data.dicom import dataset_to_image, describe
from .answer import answer_question, conflict_note, normalize_choices


def _done(path: Path, question: str) -> set[str]:
    """SOP Instance UIDs already answered (without error) for `question` in the JSONL `path`."""
    done = set()
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if fh.read(1):  # only a last line cut by a kill may be partial
                    raise InputError(f"--pacs_out '{path}': line {n} is not JSON") from None
                break
            if row.get("question") == question and "answer" in row:
                done.add(row.get("sop_instance_uid"))
    return done


def _append(fh, row: dict) -> None:
    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def answer_instance(client, ref, args, window, log=print) -> dict:
    """One instance: retrieve, window, answer, and (--write_sr / --sr_out) the SR. -> the JSONL row."""
    ds = client.retrieve(ref)
    image, info = dataset_to_image(ds, frame=args.frame, window=window, what=f"instance {ref.sop}")
    log(f"instance {ref.sop}: {describe(info)}")
    ans = answer_question(args.question, args.choices, model=args.model, adapter=args.adapter,
                          greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, quantization=args.quantization, image=image,
                          max_pixels=args.max_pixels)
    choices = normalize_choices(args.choices)
    text = f"{ans.letter}: {ans.answer}" if ans.letter else ans.answer
    note = conflict_note(ans, choices)
    if note:  # letter and text disagree: the SR and the JSONL say so rather than pick one
        text += f" [{note}]"
    row = {"study_instance_uid": ref.study, "series_instance_uid": ref.series, "sop_instance_uid": ref.sop,
           "frame": info.get("frame"), "window": info.get("window"), "question": args.question,
           "choices": args.choices, "letter": ans.letter, "answer": ans.answer,
           "conflict": note}
    if args.write_sr or args.sr_out:
        sr = pacs_mod.build_answer_sr(ds, question=args.question, choices=args.choices or [], answer=text,
                                      model=str(args.model or "base model of the adapter"),
                                      adapter=str(args.adapter) if args.adapter else None,
                                      frame=info.get("frame"))
        row["sr_sop_instance_uid"] = str(sr.SOPInstanceUID)
        if args.sr_out:
            row["sr_file"] = str(pacs_mod.write_sr(sr, args.sr_out))
        if args.write_sr:
            client.store(sr)
            row["sr_stored"] = True
    return row


def run(args, log=print) -> int:
    """--pacs URL: answer about the instance(s) found; 0, or 1 when any instance of a batch failed."""
    if not args.question:
        raise InputError("--pacs needs --question (and usually --choices)")
    window = None
    if args.window:
        from ..data.dicom import parse_window
        window = parse_window(args.window)
    client = pacs_mod.connect(args.pacs)
    log(f"PACS {client.url} (credentials: {client.auth_source})")
    refs = client.search(study=args.study, series=args.series, instance=args.instance,
                         modality=args.modality, date=args.date)
    if not args.pacs_out:
        if len(refs) > 1:
            raise InputError(f"{len(refs)} instances match; name one with --instance UID, or answer them "
                             f"all with --pacs_out FILE.jsonl")
        row = answer_instance(client, refs[0], args, window, log)
        log(f"answer: {row['letter'] + ': ' if row['letter'] else ''}{row['answer']}")
        if row.get("sr_stored"):
            log(f"SR {row['sr_sop_instance_uid']} stored in study {row['study_instance_uid']}")
        if row.get("sr_file"):
            log(f"SR written to {row['sr_file']}")
        return 0
    out = Path(os.path.expanduser(args.pacs_out))
    done = _done(out, args.question)
    reports = [r for r in refs if r.modality == "SR"]  # structured reports (ours too) have no image
    refs = [r for r in refs if r.modality != "SR"]
    todo = [r for r in refs if r.sop not in done]
    log(f"{len(refs)} instance(s) match ({len(reports)} SR(s) left out); {len(refs) - len(todo)} already "
        f"answered in {out}; {len(todo)} to ask")
    failed = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        for i, ref in enumerate(todo, 1):
            try:
                row = answer_instance(client, ref, args, window, log)
            except InputError as exc:
                failed += 1
                row = {"study_instance_uid": ref.study, "series_instance_uid": ref.series,
                       "sop_instance_uid": ref.sop, "question": args.question, "error": str(exc)}
                log(f"[{i}/{len(todo)}] instance {ref.sop}: {exc}")
            else:
                log(f"[{i}/{len(todo)}] instance {ref.sop}: answered")
            _append(fh, row)
    log(f"{len(todo) - failed} answered, {failed} failed; answers in {out}")
    return 1 if failed else 0


def print_srs(client, study: str, log=print) -> int:
    """Read back this toolkit's SRs in `study` and print their text; the number found."""
    refs = [r for r in client.search(study=study) if r.modality == "SR"]
    n = 0
    for ref in refs:
        sr = pacs_mod.read_answer_sr(client.retrieve(ref))
        if sr["series_description"] != pacs_mod.SR_SERIES_DESCRIPTION:
            continue
        n += 1
        log(f"SR {ref.sop} ({sr['verification']}, {sr['preliminary']}; {sr['series_description']})")
        log(f"  Q: {sr['question']}  choices: {' | '.join(sr['choices'])}")
        log(f"  A: {sr['answer']}   by {sr['device']}")
    return n
