"""`--export_lm_eval DIR`: the `--evaluate --method score` questions as an lm-evaluation-harness task.

The task is a YAML file + a JSON-lines data file. Each document holds the context and the per-choice
continuations as TEXT, decoded from exactly the token ids the toolkit's scorer scores
(`answers.build_score_rows`, fed as `evaluation.predict_score` feeds it: same rows, same system prompt,
same caption setting, same letter_only). Every row is checked on export: re-tokenizing its context gives
its prompt ids and re-tokenizing each continuation gives that choice's target ids (EOS included), so
lm-eval reads the same tokens; a row that would not survive the round trip is a one-line error.

`lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER --include_path DIR --tasks NAME` then gives
the toolkit's `accuracy` as `acc`. The one known difference: lm-eval moves the context's trailing
whitespace (the `\\n` after `<think>`) into the continuation and tokenizes context + continuation
together. Every choice of a question gains the same extra piece, so raw log-likelihoods shift by the
same amount per question and `acc` is unchanged, but length-normalised scores differ; the toolkit's
`accuracy_norm` is per byte of the assistant turn (compare lm-eval's `acc_bytes`, not `acc_norm`,
which divides by characters of lm-eval's own continuation).
"""
from __future__ import annotations

import json
from pathlib import Path
import re

from ..core.atomic import atomic_dir, check_output_dir
from ..core.errors import InputError

MARKER = "lm_eval_export.json"
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def check_task_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InputError(f"--task_name must be letters, digits and underscores, got '{name}'")
    return name


def score_documents(tokenizer, rows, report: dict, card_system_prompt=None, letter_only: bool = False):
    """(documents, system prompt) for `rows` (from `evaluation.load_eval_rows`): context and
    continuations decoded from the ids `answers.build_score_rows` gives the scorer."""
    from . import accuracy as evaluation
    from ..format.encoding import PromptEncoder, encode_text
    from .scoring import ScoreItem, build_score_rows

    system_prompt, include_caption = evaluation.dataset_prompt_settings(report, card_system_prompt)
    # the prompts --evaluate scores: the stored (trained) ones when the tokenizer and template match
    evaluation.use_trained_prompts(rows, report, tokenizer, system_prompt, include_caption, log=lambda *_: None)
    items = [ScoreItem(evaluation._user_text(r, include_caption), r["choices"], r.get("prompt_ids")) for r in rows]
    score_rows = build_score_rows(PromptEncoder(tokenizer, system_prompt), items, letter_only)
    docs = []
    for r, (prompt_ids, letters, targets, _nbytes) in zip(rows, score_rows):
        context = tokenizer.decode(prompt_ids, skip_special_tokens=False)
        conts = [tokenizer.decode(t, skip_special_tokens=False) for t in targets]
        where = f"row {r['index']}" + (f" ({r.get('source_file')} row {r.get('source_row')})"
                                       if r.get("source_file") else "")
        if encode_text(tokenizer, context) != list(prompt_ids):
            raise InputError(f"{where}: its prompt does not survive decode + re-tokenize; lm-eval would "
                             f"score other tokens than the toolkit")
        for letter, c, t in zip(letters, conts, targets):
            if encode_text(tokenizer, c) != list(t):
                raise InputError(f"{where}: choice {letter}'s answer turn does not survive decode + "
                                 f"re-tokenize; lm-eval would score other tokens than the toolkit")
        docs.append({"index": r["index"], "source_file": r.get("source_file"), "source_row": r.get("source_row"),
                     "letters": letters, "gold": letters.index(r["answer_label"]), "context": context,
                     "choices": conts})
    return docs, system_prompt


def task_yaml(name: str, data_file: Path, meta: dict) -> str:
    """The task config. Strings are written as JSON, which YAML reads as double-quoted scalars."""
    q = json.dumps
    lines = [
        f"# lm-evaluation-harness task written by inference_example.py --export_lm_eval ({meta['n']} questions of",
        f"# split '{meta['split']}' of {meta['dataset_dir']}). Contexts are the toolkit's chat-template prompts,",
        "# BOS included: run WITHOUT --apply_chat_template. Run it with:",
        f"#   {meta['lm_eval_command']}",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: ""',
        "num_fewshot: 0",
        "metric_list:",
    ]
    for m in ("acc", "acc_bytes", "acc_norm"):
        lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def lm_eval_command(base: str, adapter_dir, tok_dir, include_path, name: str) -> str:
    args = [f"pretrained={base}"]
    if adapter_dir:
        args.append(f"peft={adapter_dir}")
    if tok_dir:
        args.append(f"tokenizer={tok_dir}")
    return (f"lm_eval --model hf --model_args {','.join(args)} --include_path {include_path} "
            f"--tasks {name} --batch_size 8")


def export(out_dir, dataset_dir, split: str = "test", num_samples=None, model=None, adapter=None,
           letter_only: bool = False, task_name: str | None = None, overwrite: bool = False, log=print) -> Path:
    """Write `<name>.yaml` + `<name>.jsonl` (+ the marker) into `out_dir`; returns the folder."""
    from . import accuracy as evaluation
    from ..models import adapters as inference
    from ..models import loading as modeling

    name = check_task_name(task_name or f"pmcvqa_{re.sub(r'[^A-Za-z0-9_]', '_', split)}")
    out = check_output_dir(out_dir, overwrite, MARKER, "an lm-eval export", "--export_lm_eval")
    rows, report = evaluation.load_eval_rows(dataset_dir, split, num_samples)
    if report.get("reasoning") == "brief":
        raise InputError(f"dataset '{dataset_dir}' was preprocessed with --reasoning brief: choice scoring "
                         f"(and so this export) assumes an empty think block")
    if model is None and adapter is None:
        # the model the dataset was tokenized for (e.g. `tiny`), not the hub default: the export's token ids
        # must be that tokenizer's
        model = report.get("tokenizer")
        if not model:
            raise InputError(f"dataset '{dataset_dir}' does not record its tokenizer; pass --model (or --adapter) "
                             f"with the model it was preprocessed for")
        log(f"note: no --model/--adapter given: exporting for '{model}', the tokenizer dataset "
            f"'{dataset_dir}' was preprocessed with")
    base, tokenizer, adir, card = inference.base_and_tokenizer(model, adapter)
    tok_dir = inference.training_files(adir)[0] if adir is not None else None
    docs, system_prompt = score_documents(tokenizer, rows, report, inference.card_system_prompt(card)
                                          if adir is not None else None, letter_only)
    cmd = lm_eval_command(modeling.resolve_name(base), adir.resolve() if adir else None,
                          tok_dir.resolve() if tok_dir else None, out.resolve(), name)
    meta = {"task": name, "n": len(docs), "split": split, "dataset_dir": str(dataset_dir), "base_model": base,
            "adapter": str(adir) if adir else None, "letter_only": letter_only, "system_prompt": system_prompt,
            "lm_eval_command": cmd}
    with atomic_dir(out) as tmp:
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        (tmp / f"{name}.yaml").write_text(task_yaml(name, out / f"{name}.jsonl", meta), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    log(f"wrote lm-eval task '{name}' ({len(docs)} questions) to {out}; run it with:")
    log(cmd)
    return out
