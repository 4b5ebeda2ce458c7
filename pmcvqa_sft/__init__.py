"""Common package for the PMC-VQA SFT toolkit (DeepSeek-R1-Distill-Llama-8B).

One job per file:
    errors.py       one-line user errors (file, row, column) and the exit-code-2 wrapper
    prompts.py      the prompt functions users edit: system prompt, user prompt, answer format
    encoding.py     conversation -> (input_ids, labels) with the tokenizer's own template: the reference,
                    the batched fast paths (PromptEncoder, FastPromptEncoder, RowEncoder); mask visualiser
    data.py         reading and validating PMC-VQA CSVs (v1, v2)
    sources.py      where the CSVs come from: a file, a folder of release files, or the Hub
    sample_data.py  generator of the bundled PMC-VQA-format sample under data/sample/
    tiny.py         the embedded offline tiny Llama model and tokenizer
    tiny_vision.py  the embedded offline tiny Qwen2.5-VL model, tokenizer and image processor
    vision_processor.py  image-text processor without torchvision; image-token counts and expansion
    vision_sample.py     generator of the bundled image sample under data/sample_vision/
Scripts -> package -> libraries, never back.
"""

__version__ = "0.1.0"
