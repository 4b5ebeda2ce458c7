"""The `make demo` pipeline at a reduced size, through the real scripts: the tuned model must beat the base.

Same commands as the Makefile's demo target (8-bit bitsandbytes base + LoRA on the CPU), with fewer
training steps and questions so it fits the test budget.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
STEPS = 400


def _run(args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=3 * HANG_GUARD_S)
    assert out.returncode == 0, f"{args[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_demo_pipeline_tuned_beats_base(tmp_path, tiny_dir):
    data, model, evald = tmp_path / "data", tmp_path / "model", tmp_path / "eval"
    _run(["preprocess_pmc_vqa_for_sft.py", "--data", "data/sample", "--tokenizer", "tiny",
          "--output_dir", str(data)])
    _run(["train_sft_example.py", "--model", "tiny", "--dataset_dir", str(data), "--output_dir", str(model),
          "--quantization", "8bit", "--max_steps", str(STEPS), "--learning_rate", "1e-3",
          "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
          "--no-gradient_checkpointing", "--eval_steps", "200", "--logging_steps", "25",
          "--report_to", "none", "--no-progress"])
    card = json.loads((model / "run_card.json").read_text())
    # evaluated unquantized to keep the test short (`make demo` evaluates the 8-bit base)
    out = _run(["inference_example.py", "--adapter", str(model), "--quantization", "none", "--evaluate",
                "--compare_base", "--dataset_dir", str(data), "--split", "test", "--num_samples", "120",
                "--output_dir", str(evald)])
    metrics = json.loads((evald / "metrics.json").read_text())
    base, tuned = metrics["base"]["accuracy"], metrics["tuned"]["accuracy"]
    assert 0.0 <= base <= 1.0 and 0.0 <= tuned <= 1.0
    assert tuned >= base + 0.20, f"tuned {tuned:.3f} vs base {base:.3f}\n{out.stdout[-1500:]}"
    majority = metrics.get("majority_baseline", metrics["tuned"].get("majority_baseline"))
    if isinstance(majority, dict):
        majority = majority.get("accuracy", majority.get("share"))
    assert majority is None or tuned > majority
    assert (evald / "predictions.jsonl").stat().st_size > 0
    assert (model / "loss_curve.png").stat().st_size > 0
    assert card  # the run card was written
