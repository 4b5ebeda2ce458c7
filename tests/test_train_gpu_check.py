"""CPU-side pieces of the GPU checks: the 8B-shape check's plumbing (dry run) and sharded-training setup."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_check_dry_run(tmp_path, one_thread):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train_check
    out = tmp_path / "gpu.json"
    code = gpu_train_check.main(["--dry_run", "--steps", "3", "--warmup", "1", "--seq_len", "48", "--target_len", "8",
                                 "--batch", "2", "--out", str(out), "--workdir", str(tmp_path / "w")])
    assert code == 0
    res = json.loads(out.read_text())
    assert [m["mode"] for m in res["modes"]] == ["8bit", "4bit", "bf16"]
    for m in res["modes"]:
        assert "error" not in m and m["tokens_per_s"] > 0 and m["steps_timed"] == 2
        assert 0 < m["trainable_parameters"]["trainable"] < m["trainable_parameters"]["total"]
        assert len(m["loss_first_last"]) == 2
    assert (tmp_path / "w" / "random_8b" / "config.json").is_file()  # random weights, built locally


def test_gpu_train_check_builds_the_8b_shape_without_the_fixture(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train_check
    a = gpu_train_check.parse_args(["--config", str(tmp_path / "absent.json")])
    cfg, source = gpu_train_check.model_config(a)
    assert source.startswith("built-in")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (32, 4096, 8, 128256)
    real = ROOT.parent / "shared" / "fixtures" / "deepseek_r1_distill_llama_8b" / "config.json"
    if real.is_file():
        cfg2, _ = gpu_train_check.model_config(gpu_train_check.parse_args(["--config", str(real)]))
        assert (cfg2.intermediate_size, cfg2.num_attention_heads) == (cfg.intermediate_size, cfg.num_attention_heads)


def test_sharded_training_setup(monkeypatch, tiny_dir):
    import torch

    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.models.loading import load_model, quantization_config, sharded_training
    assert not sharded_training()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded_training()
    with pytest.raises(InputError, match="cannot be sharded"):
        load_model(str(tiny_dir), "8bit", sharded=True)
    # FSDP/ZeRO-3 QLoRA: 4-bit storage dtype = the other weights' dtype
    assert quantization_config("4bit", quant_storage=torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not sharded_training()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharded_training()


@pytest.mark.parametrize("vision", [False, True], ids=["text-8b-shape", "qwen25vl-7b-shape"])
def test_gpu_grpo_check_dry_run(tmp_path, one_thread, vision):
    """--grpo: TRL GRPOTrainer steps through the project's model build, config and rewards, every mode."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train_check
    out = tmp_path / "grpo.json"
    args = ["--grpo", "--dry_run", "--steps", "2", "--warmup", "1", "--grpo_prompts", "2", "--num_generations", "2",
            "--completion_len", "6", "--out", str(out), "--workdir", str(tmp_path / "w")]
    if vision:
        args += ["--vision", "--modes", "8bit,bf16", "--image_size", "56"]
    assert gpu_train_check.main(args) == 0
    res = json.loads(out.read_text())
    assert res["stage"] == "grpo" and res["num_generations"] == 2
    assert [m["mode"] for m in res["modes"]] == (["8bit", "bf16"] if vision else ["8bit", "4bit", "bf16"])
    for m in res["modes"]:
        assert "error" not in m and m["completions_per_s"] > 0 and m["steps_timed"] == 1
        assert m["mean_completion_tokens"] == 6 and m["clipped_ratio"] == 1.0  # random weights never stop
        assert "rewards/correct/mean" in m["reward_keys"] and "rewards/format_ok/mean" in m["reward_keys"]
