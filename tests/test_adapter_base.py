"""An adapter whose base model can't be found: one line that says why and what to pass, fast offline."""
from __future__ import annotations

import json

import pytest


def _adapter(tmp_path, base: str):
    d = tmp_path / "run" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    return d.parent


@pytest.mark.parametrize("base", ["/nonexistent/models/tiny-r1-llama", "../moved/base-model", "~/gone/base"])
def test_missing_local_base_folder_suggests_model(tmp_path, base):
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.models.adapters import load_for_inference
    with pytest.raises(InputError) as err:
        load_for_inference(None, str(_adapter(tmp_path, base)), "none", log=lambda *_: None)
    msg = str(err.value)
    assert base in msg and "does not exist" in msg and "--model" in msg and "\n" not in msg


def test_adapter_fit_check_uses_the_local_cache_when_the_hub_is_unreachable(tmp_path, tiny_tokenizer, monkeypatch):
    """No 27 s of hub retries: with no route to the hub the config is looked up in the local cache only."""
    import transformers

    from pmcvqa_sft.core import hub
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.models.adapters import check_adapter_fits
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "huggingface.co:443 unreachable (test)")
    calls = []

    def no_network(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    with pytest.raises(InputError) as err:
        check_adapter_fits(tmp_path, "someorg/not-cached-model", tiny_tokenizer)
    assert calls == [{"local_files_only": True}]
    assert "unreachable" in str(err.value) and "--model tiny" in str(err.value)
