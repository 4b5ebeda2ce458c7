"""One table of a multi-stage run (`make demo-reasoning`: base -> SFT -> +GRPO) from its evaluations.

    python -m pmcvqa_sft.evaluate.stages RUN base=RUN/eval-base sft=RUN/eval-sft grpo=RUN/eval-grpo

Each folder is an `inference_example.py --evaluate --method generate --output_dir` folder; its model's
block (accuracy = strict, accuracy_letter, accuracy_text, parsed_rate, ...) is copied as is under the
stage's name into RUN/metrics.json, and the table is printed. The numbers are the evaluation's own.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.atomic import write_json
from ..core.errors import InputError, OneLineParser, run_main

COLUMNS = (("accuracy", "strict"), ("accuracy_letter", "letter"), ("accuracy_text", "text"),
           ("parsed_rate", "parsed"), ("think_closed_rate", "think closed"))
KEPT = ("n", "accuracy", "ci95", "accuracy_letter", "accuracy_text", "parsed_rate", "think_closed_rate",
        "accuracy_lenient", "cut_by_budget_rate", "mean_reasoning_tokens", "accuracy_definition", "method")


def stage_block(eval_dir: Path) -> dict:
    path = Path(eval_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"'{path}' is not an evaluation's metrics.json ({exc})") from None
    block = metrics.get("model") or metrics.get("tuned")
    if not isinstance(block, dict) or "accuracy" not in block:
        raise InputError(f"'{path}' holds no single-model evaluation block")
    return {**{k: block[k] for k in KEPT if k in block}, "eval_dir": str(eval_dir),
            "adapter": metrics.get("adapter"), "split": metrics.get("split")}


def table(blocks: dict[str, dict]) -> str:
    head = f"{'stage':<8}" + "".join(f"{name:>14}" for _, name in COLUMNS) + f"{'n':>6}"
    lines = [head]
    for stage, b in blocks.items():
        cells = "".join(f"{100 * b[k]:>13.1f}%" if isinstance(b.get(k), (int, float)) else f"{'-':>14}"
                        for k, _ in COLUMNS)
        lines.append(f"{stage:<8}{cells}{b.get('n', 0):>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("stages", nargs="+", help="name=EVAL_DIR, in table order")
    a = p.parse_args(argv)
    blocks = {}
    for item in a.stages:
        name, sep, d = item.partition("=")
        if not sep or not name:
            raise InputError(f"'{item}': give each stage as name=EVAL_DIR")
        blocks[name] = stage_block(Path(d))
    out = Path(a.run_dir) / "metrics.json"
    write_json(out, {**blocks, "accuracy_definition": next(iter(blocks.values())).get("accuracy_definition")})
    print(table(blocks))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
