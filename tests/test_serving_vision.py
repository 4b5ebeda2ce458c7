"""Serving an image model: the served model sees the figure (data-URL image parts through the openai client
give --image's greedy answers for every bundled demo figure, and prompt_tokens count the image tokens under
the run card's max_pixels); bad figures are one-line 400s; vLLM refuses an image adapter in one line.
The run and its server are conftest's session fixtures `vision_run` / `served_vision`, shared with
tests/test_rationales_vision.py (one training, one server)."""
from __future__ import annotations

import base64
import io
import mimetypes

import pytest

from tests.test_serving import HANG_GUARD, _post


def _data_url(path) -> str:
    return f"data:{mimetypes.guess_type(str(path))[0]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_served_image_model_answers_as_image_flag(served_vision, vision_run):
    from openai import OpenAI
    from PIL import Image

    from pmcvqa_sft import prompts
    from pmcvqa_sft.format.media import card_max_pixels, num_image_tokens
    from pmcvqa_sft.infer.answer import answer_question
    from pmcvqa_sft.infer.console import demo_questions
    from pmcvqa_sft.models.adapters import find_adapter_dir, training_files
    from pmcvqa_sft.models.loading import load_processor
    from tests.test_inference import one_thread
    client = OpenAI(base_url=served_vision, api_key="none", max_retries=0, timeout=HANG_GUARD)
    assert [m.id for m in client.models.list().data] == [vision_run.name]  # the run folder's name
    tok_dir, card = training_files(find_adapter_dir(vision_run))
    max_pixels = card_max_pixels(card)
    assert max_pixels  # the run card records the training cap; the served processor must use it
    ip = load_processor(str(tok_dir)).image_processor
    questions = demo_questions()
    assert len(questions) >= 2
    for q, choices, _gold, path in questions:
        with one_thread():
            ref = answer_question(q, choices, adapter=str(vision_run), image=str(path), greedy=True,
                                  quantization="none", max_new_tokens=16)
        text = prompts.format_user_prompt(q, choices)
        ask = lambda content: client.chat.completions.create(  # noqa: E731
            model=vision_run.name, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=16)
        with_image = ask([{"type": "image_url", "image_url": {"url": _data_url(path)}}, {"type": "text", "text": text}])
        text_only = ask(text)
        assert with_image.choices[0].message.content.strip() == ref.raw.strip(), path.name
        w, h = Image.open(path).size
        n = num_image_tokens(w, h, ip, max_pixels)
        # the figure's tokens are counted: <|vision_start|> + n x <|image_pad|> + <|vision_end|>
        assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + n + 2, path.name


def test_served_image_model_takes_dicom_as_the_cli_shows_it(served_vision, vision_run, tmp_path):
    """A DICOM object sent as a data URL gets the answer `--image x.dcm` gives, and the same image tokens as
    the PNG it was made from (a secondary capture keeps the pixels exactly)."""
    from openai import OpenAI

    from pmcvqa_sft import prompts
    from pmcvqa_sft.data.dicom_samples import secondary_capture, to_bytes
    from pmcvqa_sft.infer.answer import answer_question
    from pmcvqa_sft.infer.console import demo_questions
    from tests.test_inference import one_thread
    client = OpenAI(base_url=served_vision, api_key="none", max_retries=0, timeout=HANG_GUARD)
    q, choices, _gold, path = demo_questions()[0]
    dcm = tmp_path / "figure.dcm"
    dcm.write_bytes(to_bytes(secondary_capture(path)))
    with one_thread():
        ref = answer_question(q, choices, adapter=str(vision_run), image=str(dcm), greedy=True,
                              quantization="none", max_new_tokens=16)
    text = prompts.format_user_prompt(q, choices)
    url = "data:application/dicom;base64," + base64.b64encode(dcm.read_bytes()).decode()
    ask = lambda u: client.chat.completions.create(  # noqa: E731
        model=vision_run.name, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                               {"type": "text", "text": text}]}])
    got, png = ask(url), ask(_data_url(path))
    assert got.choices[0].message.content.strip() == ref.raw.strip()
    assert got.usage.prompt_tokens == png.usage.prompt_tokens


def test_served_image_model_refuses_bad_figures_in_one_line(served_vision, vision_run):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (5000, 10)).save(buf, "PNG")
    wide = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for url, word in ((wide, "aspect_ratio"), ("data:image/png;base64,aGVsbG8=", "unreadable"),
                      ("data:image/png;base64,@@@", "not valid base64"),
                      ("https://example.org/x.png", "data: URL")):
        code, out = _post(served_vision, {"model": vision_run.name, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]})
        assert code == 400 and word in out["detail"] and "\n" not in out["detail"], out


def test_vllm_refuses_an_image_adapter_in_one_line(vision_run, tmp_path):
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.infer import serving
    with pytest.raises(InputError, match="--engine transformers"):
        serving.prepare_vllm(str(vision_run), None, tmp_path, log=lambda *_: None)
