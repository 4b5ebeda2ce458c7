"""tiny_vision.py and vision_processor.py: the embedded tiny Qwen2.5-VL and placeholder arithmetic."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from pmcvqa_sft.models import tiny as tiny_vision
from pmcvqa_sft.format import media as vp
from pmcvqa_sft.models.loading import load_processor


@pytest.fixture(scope="module")
def tv_dir():
    return tiny_vision.ensure_tiny_vision()


@pytest.fixture(scope="module")
def proc(tv_dir):
    return load_processor(str(tv_dir))


def conversation(n_images=1, text="What colour is the square?"):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def test_build_offline_writes_model_tokenizer_processor(tmp_path):
    out = tiny_vision.build_tiny_vision(tmp_path / "tv", log=lambda *_: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja", "generation_config.json", "tiny_vision_build.json"} <= names
    stamp = json.loads((out / "tiny_vision_build.json").read_text())
    assert stamp["recipe"] == tiny_vision._vision_recipe_key()
    assert 500_000 < stamp["parameters"] < 800_000
    with pytest.raises(FileExistsError):
        tiny_vision.build_tiny_vision(out)


def test_resolve_alias_and_passthrough(tv_dir):
    assert tiny_vision.resolve("tiny-vision") == str(tv_dir)
    assert tiny_vision.resolve("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_tokenizer_specials_and_chat_template(proc):
    tok = proc.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id  # padding can't swallow the trained EOS
    for t in tiny_vision.SPECIALS:  # each special is a single token
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert tok("abc")["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]  # no BOS, like Qwen
    text = proc.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What colour is the square?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    plain = proc.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
                                     tokenize=False)
    assert plain == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"


def test_processor_gives_16_image_tokens_at_112px_and_forward_pass(tv_dir, proc):
    from transformers import AutoModelForImageTextToText

    text = proc.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[Image.new("RGB", (112, 112), (200, 20, 20))], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(vp.image_token_id(proc)) == 16
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert batch["mm_token_type_ids"][0].tolist() == vp.mm_token_type_ids(ids, proc)
    model = AutoModelForImageTextToText.from_pretrained(str(tv_dir)).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with torch.no_grad():
        out = model(**batch)
        blank = model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
    assert out.logits.shape == (1, len(ids), len(proc.tokenizer))
    assert torch.isfinite(out.logits).all()
    # the figure reaches the logits (the pixels are really used, not ignored)
    assert not torch.allclose(out.logits[0, -1], blank.logits[0, -1])


@pytest.mark.parametrize("size", [(112, 112), (56, 56), (30, 20), (224, 112), (640, 480), (97, 1500),
                                  (1000, 7)])
@pytest.mark.parametrize("max_pixels", [None, 28 * 28, 56 * 56, 448 * 448])
def test_num_image_tokens_matches_processor_expansion(proc, size, max_pixels):
    w, h = size
    predicted = vp.num_image_tokens(w, h, proc.image_processor, max_pixels)
    text = proc.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=False)
    kw = {} if max_pixels is None else {"images_kwargs": {"size": vp.processor_size(proc.image_processor, max_pixels)}}
    batch = proc(text=[text], images=[Image.new("RGB", (w, h), (9, 99, 199))], **kw)
    assert batch["input_ids"][0].count(vp.image_token_id(proc)) == predicted
    assert predicted >= 1


def test_num_image_tokens_known_values(proc):
    ip = proc.image_processor
    assert vp.num_image_tokens(112, 112, ip) == 16
    assert vp.num_image_tokens(448, 448, ip, max_pixels=448 * 448) == 256
    assert vp.num_image_tokens(448, 448, ip, max_pixels=112 * 112) == 16  # capped
    with pytest.raises(ValueError, match="aspect ratio"):
        vp.num_image_tokens(5000, 10, ip)


def test_image_settings_lowers_min_below_cap(proc):
    s = vp.image_settings(proc.image_processor, 28 * 28)
    assert s["min_pixels"] == s["max_pixels"] == 784
    assert vp.image_settings(proc.image_processor)["max_pixels"] == 112 * 112


def test_expand_image_tokens(proc):
    t = vp.image_token_id(proc)
    ids = [10, 11, t, 12, t, 13]
    labels = [-100, -100, -100, -100, 7, 8]
    new_ids, new_labels = vp.expand_image_tokens(ids, labels, [3, 2], t)
    assert new_ids == [10, 11, t, t, t, 12, t, t, 13]
    assert new_labels == [-100, -100, -100, -100, -100, -100, -100, -100, 8]
    assert vp.expand_image_tokens(ids, None, [1, 1], t) == (ids, None)
    with pytest.raises(ValueError, match="2 image placeholder"):
        vp.expand_image_tokens(ids, labels, [3], t)


def test_expansion_equals_processor_on_real_text(proc):
    """Stored (unexpanded) ids expanded by our function == the processor's own expansion."""
    text = proc.apply_chat_template(conversation(2), add_generation_prompt=True, tokenize=False)
    stored = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    imgs = [Image.new("RGB", (112, 112)), Image.new("RGB", (300, 140))]
    counts = [vp.num_image_tokens(*im.size, proc.image_processor) for im in imgs]
    expanded, _ = vp.expand_image_tokens(stored, None, counts, vp.image_token_id(proc))
    assert proc(text=[text], images=imgs)["input_ids"][0] == expanded


def test_load_processor_from_hub_layout_folder(tmp_path, proc):
    """A folder laid out like Qwen/Qwen2.5-VL-7B-Instruct (preprocessor_config.json with min/max_pixels)."""
    folder = tmp_path / "qwen-like"
    proc.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # the hub repo ships chat_template.json
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'X' }}"}))
    loaded = load_processor(str(folder))
    assert vp.image_settings(loaded.image_processor)["max_pixels"] == 12845056
    assert vp.num_image_tokens(448, 448, loaded.image_processor) == 256
    assert loaded.chat_template == "{{ 'X' }}"  # the processor's template wins over the tokenizer's


def test_ensure_rebuilds_on_stale_stamp(tmp_path):
    out = tiny_vision.build_tiny_vision(tmp_path / "tv", log=lambda *_: None)
    stamp = out / "tiny_vision_build.json"
    stamp.write_text(json.dumps({"recipe": "stale"}))
    assert tiny_vision.ensure_tiny_vision(out, log=lambda *_: None) == out
    assert json.loads(stamp.read_text())["recipe"] == tiny_vision._vision_recipe_key()
    shutil.rmtree(out)
