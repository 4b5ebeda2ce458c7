"""Common package for the PMC-VQA SFT toolkit (DeepSeek-R1-Distill-Llama-8B, and image-text models).

Subpackages by stage, one import direction (checked by the import-linter contract in .importlinter):
    core/        errors, atomic writes, hub probe, threads, paths and model aliases, notices
    prompts.py   the prompt functions users edit: system prompt, user prompt, answer format
    format/      conversation -> (input_ids, labels); answer parsing; image-token arithmetic
    data/        PMC-VQA CSVs, sources, figures, the on-disk contract, bundled samples, collators
    models/      tiny models, model kind, loading + quantization, processor, LoRA, adapters
    preprocess/  train/  infer/     the three stages (they never import each other)
    evaluate/    accuracy, metrics, choice scoring, compare runs, lm-eval export
    verify/      installation checks, smoke
Scripts -> verify -> evaluate -> stages -> models -> data -> format -> prompts -> core, never back.
"""

__version__ = "0.2.0"
