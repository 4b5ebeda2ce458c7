"""CPU dry run of bench/gpu_train_check.py --vision (the Qwen2.5-VL-7B-shaped training check's plumbing)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_gpu_vision_check_dry_run(tmp_path, one_thread):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train_check
    out = tmp_path / "gpu_vision.json"
    code = gpu_train_check.main(["--vision", "--dry_run", "--steps", "3", "--warmup", "1", "--batch", "2",
                                 "--image_size", "112", "--text_len", "32", "--target_len", "8",
                                 "--out", str(out), "--workdir", str(tmp_path / "w")])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["model"] == "Qwen2.5-VL-7B shape" and res["image_size"] == 112
    (m,) = res["modes"]
    assert m["mode"] == "8bit" and "error" not in m
    assert m["image_tokens_per_row"] == 16 and m["tokens_per_row"] == 32 - 1 + 16  # placeholder expanded
    assert m["tokens_per_s"] > 0 and m["steps_timed"] == 2 and len(m["loss_first_last"]) == 2
    # the LM really is 8-bit, the vision tower is not
    assert m["int8_linear_layers"] == 2 * 7 and m["int8_in_vision_tower"] == 0
    assert 0 < m["trainable_parameters"]["trainable"] < m["trainable_parameters"]["total"]
    assert (tmp_path / "w" / "random_vl_7b" / "config.json").is_file()


def test_gpu_vision_check_has_the_published_7b_shape():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_train_check
    cfg, source = gpu_train_check.vl_config(gpu_train_check.parse_args(["--vision"]))
    assert source.startswith("built-in Qwen/Qwen2.5-VL-7B")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == (28, 3584, 28, 4, 18944, 152064)
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (32, 1280, 16, 3420, 3584)
    assert cfg.image_token_id == 151655
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < n < 8.6e9  # Qwen2.5-VL-7B has 8.29 B parameters
