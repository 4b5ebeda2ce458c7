"""Use a fine-tuned model: chat, demo, one question, evaluation, merging.

Commands (offline, with the embedded tiny model; replace `tiny` / the adapter folder with your own):
    python inference_example.py --adapter runs/demo/model --demo
    python inference_example.py --adapter runs/demo/model --interactive
    python inference_example.py --adapter runs/demo/model --greedy \\
        --question "Which organ produces bile?" --choices "Kidney" "Spleen" "Liver" "Heart"
    python inference_example.py --adapter runs/demo/model --evaluate --dataset_dir runs/demo/data \\
        --compare_base --output_dir runs/demo/eval
    python inference_example.py --adapter runs/demo/model --merge_and_save runs/demo/merged
    python inference_example.py --model runs/demo/merged --demo
    python inference_example.py --adapter runs/demo/model --serve            # http://127.0.0.1:8000/v1
    python inference_example.py --adapter runs/demo/model --export_lm_eval runs/demo/lm_eval \\
        --dataset_dir runs/demo/data --split test
    # an image model (make demo-vision): one figure, the evaluation with the blind ablation, a comparison
    python inference_example.py --adapter runs/demo-vision/model --greedy --image data/sample_vision/demo/SYNTE0194_F1.png \\
        --question "What colour is the square in the figure?" --choices Red Green Blue Yellow
    # a DICOM figure (docs/PACS.md): frame 3, an explicit window, and the exact image the model got
    python inference_example.py --adapter runs/demo-vision/model --greedy --image study.dcm --frame 3 \\
        --window 40,400 --save_model_input seen.png --question "..." --choices A B C D
    # a PACS (docs/PACS.md; export PMCVQA_PACS_USER=... PMCVQA_PACS_PASSWORD=... first): one instance with
    # the answer stored back as an SR, then every CT of a study into a JSONL
    python inference_example.py --adapter runs/demo-vision/model --greedy --pacs http://127.0.0.1:8042/dicom-web \\
        --study 1.2.3 --instance 1.2.3.4 --question "..." --choices A B C D --write_sr
    python inference_example.py --adapter runs/demo-vision/model --greedy --pacs http://127.0.0.1:8042/dicom-web \\
        --study 1.2.3 --modality CT --question "..." --choices A B C D --pacs_out answers.jsonl --sr_out srs/
    python inference_example.py --adapter runs/demo-vision/model --evaluate --dataset_dir runs/demo-vision/data \\
        --compare_base --output_dir runs/demo-vision/eval
    python inference_example.py --compare_runs runs/demo-vision/eval runs/demo-vision-2/eval   # same test split
    # rationales by rejection sampling (docs/REASONING.md), locally or from any OpenAI-compatible endpoint
    python inference_example.py --adapter runs/demo/model --sample_rationales runs/demo/rationales.jsonl \\
        --dataset_dir runs/demo/data --split train --samples 4 --num_samples 32
    PMCVQA_ENDPOINT_KEY=... python inference_example.py --endpoint http://127.0.0.1:8000/v1 \\
        --endpoint_model NAME --sample_rationales runs/demo/rationales.jsonl --dataset_dir runs/demo/data --split train
    # an endpoint scored like a local run, then beside it
    python inference_example.py --evaluate --method generate --endpoint http://127.0.0.1:8000/v1 \\
        --endpoint_model NAME --dataset_dir runs/demo/data --output_dir runs/demo/eval-endpoint --concurrency 8
    python inference_example.py --compare_runs runs/demo/eval runs/demo/eval-endpoint
The real model: `--adapter runs/r1-8b-lora` (its base, deepseek-ai/DeepSeek-R1-Distill-Llama-8B, comes
from the adapter config; 8-bit on CUDA by default). See docs/INFERENCE_AND_EVALUATION.md.
"""
from __future__ import annotations

import argparse
import json

from pmcvqa_sft.core.errors import OneLineParser


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- model ----
    p.add_argument("--model", default=None,
                   help="base model: hub id, local folder (a merged model too) or 'tiny'; default: the "
                        "adapter's base model, else deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    p.add_argument("--adapter", default=None,
                   help="training output folder (adapter_config.json in it or in its adapter/ subfolder), or the run "
                        "folder holding it as model/ (make demo's RUN); "
                        "its tokenizer and chat template are used")
    p.add_argument("--quantization", choices=["8bit", "4bit", "none"], default=None,
                   help="weight quantization (default: 8bit on CUDA, none elsewhere)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny model or on a CPU machine with <= 4 cores, "
                        "else torch's; env PMCVQA_THREADS)")
    # ---- what to do (one of) ----
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interactive", action="store_true", help="chat in the terminal (streams tokens)")
    mode.add_argument("--demo", action="store_true", help="answer the built-in medical questions")
    mode.add_argument("--question", default=None, help="ask one question")
    mode.add_argument("--evaluate", action="store_true", help="measure accuracy on a preprocessed split")
    mode.add_argument("--merge_and_save", metavar="DIR", default=None,
                      help="write base + adapter merged into DIR (reloads the base unquantized)")
    mode.add_argument("--serve", action="store_true",
                      help="serve the tuned model behind an OpenAI-compatible endpoint (docs/SERVING.md)")
    mode.add_argument("--export_lm_eval", metavar="DIR", default=None,
                      help="write the --evaluate --method score questions of --dataset_dir/--split as an "
                           "lm-evaluation-harness task (YAML + data) into DIR")
    # ---- single question ----
    p.add_argument("--choices", nargs="+", default=None,
                   help='choices of --question: "MRI" "CT" ... or "A: MRI" "B: CT" ... (at most 4)')
    p.add_argument("--caption", default=None, help="figure caption to give with --question (PMC-VQA v2 style)")
    p.add_argument("--json", action="store_true", help="print --question's result as JSON")
    # ---- generation ----
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's generation_config, 0.6 for R1)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling (default: generation_config)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="new-token limit (default 512; 96 for --evaluate --method generate)")
    p.add_argument("--greedy", action="store_true", help="no sampling (deterministic output)")
    p.add_argument("--hide_think", action="store_true", help="start the chat with the reasoning hidden")
    # ---- evaluation ----
    p.add_argument("--dataset_dir", default=None, help="preprocess_pmc_vqa_for_sft.py output folder")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--batch_size", type=int, default=16, help="questions per forward pass (default: %(default)s)")
    p.add_argument("--method", choices=["score", "generate"], default="score",
                   help="score: log-likelihood of each choice (no generation); generate: greedy "
                        "generation + answer extraction (default: %(default)s)")
    p.add_argument("--letter_only", action="store_true",
                   help="score only 'Answer: B' instead of 'Answer: B. <choice text>'")
    p.add_argument("--compare_base", action="store_true",
                   help="also evaluate the base model (adapter disabled) and show both side by side")
    p.add_argument("--output_dir", default=None, help="write predictions.jsonl and metrics.json here")
    # ---- image models (--model tiny-vision, Qwen/Qwen2.5-VL-7B-Instruct, or their adapters) ----
    v = p.add_argument_group("image models", "for image-text-to-text models (see docs/VISION.md)")
    v.add_argument("--image", default=None, help="figure file for --question (PNG, JPEG, ... or DICOM .dcm, shown "
                                                 "as a viewer shows it: modality LUT, stored window, MONOCHROME1 "
                                                 "inverted; docs/PACS.md)")
    v.add_argument("--frame", type=int, default=None,
                   help="DICOM --image: 1-based frame of a multi-frame object (default: the middle one, printed)")
    v.add_argument("--window", default=None, metavar="CENTER,WIDTH",
                   help="DICOM --image: VOI window to apply (default: the first stored window, else a "
                        "0.5-99.5 percentile window)")
    v.add_argument("--save_model_input", default=None, metavar="PNG",
                   help="write the exact RGB image handed to the processor (after DICOM windowing) to this PNG")
    v.add_argument("--max_pixels", type=int, default=None,
                   help="cap on each figure's width x height after resizing (default: the training run's)")
    v.add_argument("--images", default=None,
                   help="--evaluate: where the dataset's figures are now (folder or zip), if they moved")
    v.add_argument("--blind", action=argparse.BooleanOptionalAction, default=True,
                   help="--evaluate: also run the blind ablation (the model with every figure blanked); "
                        "--no-blind skips it")
    # ---- PACS over DICOMweb (docs/PACS.md); credentials from the environment or a netrc file only ----
    k = p.add_argument_group("PACS (DICOMweb)", "ask about images in a PACS; credentials: PMCVQA_PACS_USER + "
                             "PMCVQA_PACS_PASSWORD, PMCVQA_PACS_TOKEN, or a netrc file (PMCVQA_PACS_NETRC, "
                             "default ~/.netrc) - never a flag")
    k.add_argument("--pacs", default=None, metavar="URL",
                   help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web (no credentials in it)")
    k.add_argument("--study", default=None, metavar="UID", help="--pacs: Study Instance UID to search")
    k.add_argument("--series", default=None, metavar="UID", help="--pacs: Series Instance UID (with --study)")
    k.add_argument("--instance", default=None, metavar="UID", help="--pacs: SOP Instance UID")
    k.add_argument("--modality", default=None, help="--pacs: only instances of this modality (CT, MR, CR, ...)")
    k.add_argument("--date", default=None, metavar="YYYYMMDD[-YYYYMMDD]", help="--pacs: study date (range)")
    k.add_argument("--pacs_out", default=None, metavar="JSONL",
                   help="--pacs batch: answer every matching instance, one JSON line each (errors recorded, "
                        "appended; a rerun skips instances already answered)")
    k.add_argument("--write_sr", action="store_true",
                   help="--pacs: store each answer as a Comprehensive SR (new series, UNVERIFIED, PRELIMINARY, "
                        "not for diagnostic use) in the source study over STOW-RS")
    k.add_argument("--sr_out", default=None, metavar="DIR", help="--pacs: write each SR as DIR/<SOP UID>.dcm")
    mode.add_argument("--compare_runs", nargs="+", metavar="EVAL_DIR", default=None,
                      help="side-by-side table of several --evaluate --output_dir folders on their common "
                           "test rows (e.g. text-only tuned, image base, image tuned, blind)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir / merge folder")
    # ---- serving and lm-eval export ----
    mode.add_argument("--sample_rationales", metavar="OUT.jsonl", default=None,
                      help="rejection sampling: up to --samples completions per question of --split, keep the "
                           "first strictly right one (text or image model); append-only, a rerun resumes; "
                           "report in OUT.report.json (docs/REASONING.md)")
    ep = p.add_argument_group("endpoints (--sample_rationales, --evaluate)", "any OpenAI-compatible server; the "
                              "API key comes from PMCVQA_ENDPOINT_KEY or OPENAI_API_KEY (needs: pip install openai)")
    ep.add_argument("--endpoint", metavar="URL", default=None,
                    help="base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1) instead of a local model")
    ep.add_argument("--endpoint_model", metavar="NAME", default=None, help="the model name to request from --endpoint")
    ep.add_argument("--samples", type=int, default=4,
                    help="--sample_rationales: completions tried per question (default: %(default)s)")
    ep.add_argument("--concurrency", type=int, default=8,
                    help="--evaluate --endpoint: requests in flight at once (default: %(default)s)")
    ep.add_argument("--endpoint_retries", type=int, default=4,
                    help="retries of a failed or timed-out request, with exponential backoff (default: %(default)s)")
    srv = p.add_argument_group("serving (--serve) and lm-eval export (--export_lm_eval)")
    srv.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                     help="transformers: `transformers serve` on the merged model (CPU, small GPUs); vllm: "
                          "`vllm serve BASE --enable-lora` (GPU, vLLM installed) (default: %(default)s)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; the engines have no authentication, so anything but "
                          "127.0.0.1 exposes the model to the network (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    srv.add_argument("--served_model_name", default=None,
                     help="model name clients send (default: the run folder's name)")
    srv.add_argument("--serve_cache", metavar="DIR", default=None,
                     help="where merged models for serving are cached, one per adapter version "
                          "(default: ~/.cache/pmcvqa_sft/served)")
    srv.add_argument("--ready_timeout", type=float, default=900.0,
                     help="seconds to wait for the engine to answer before giving up (default: %(default)s)")
    srv.add_argument("--max_request_bytes", type=int, default=None,
                     help="--serve: largest request body accepted, in bytes; a larger one is refused with 413 "
                          "before it is parsed (default: 16 MiB, room for a few figures as data URLs)")
    srv.add_argument("--max_prompt_tokens", type=int, default=None,
                     help="--serve: longest prompt accepted, in tokens, refused with 400 (a text that cannot fit "
                          "before it is tokenized) (default: the model's context - 1); answers are always "
                          "clipped to the room left in the context")
    srv.add_argument("--task_name", default=None,
                     help="lm-eval task name for --export_lm_eval (default: pmcvqa_<split>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pmcvqa_sft.core.errors import InputError
    args = parse_args(argv)
    if args.threads is not None:
        from pmcvqa_sft.core.threads import configure_threads
        configure_threads(threads=args.threads)
    if args.choices and not args.question:
        raise InputError("--choices needs --question")
    if args.image and not args.question:
        raise InputError("--image needs --question (in --interactive, use /image PATH)")
    for flag in ("frame", "window", "save_model_input"):
        if getattr(args, flag) is not None and not args.image and not (args.pacs and flag != "save_model_input"):
            raise InputError(f"--{flag} needs --image")
    if args.compare_runs:
        from pmcvqa_sft.evaluate.compare import compare_runs
        print(compare_runs(args.compare_runs))
        return 0
    if not args.pacs and any(getattr(args, f) for f in ("study", "series", "instance", "modality", "date", "pacs_out",
                                         "write_sr", "sr_out")):
        raise InputError("--study/--series/--instance/--modality/--date/--pacs_out/--write_sr/--sr_out need --pacs")
    if not (args.interactive or args.demo or args.question or args.evaluate or args.merge_and_save
            or args.serve or args.export_lm_eval or args.sample_rationales):
        raise InputError("nothing to do: pass one of --interactive, --demo, --question, --evaluate, "
                         "--merge_and_save, --serve, --export_lm_eval, --sample_rationales (see --help)")
    if args.sample_rationales or (args.evaluate and args.endpoint):
        from pmcvqa_sft.evaluate import teacher
        if args.sample_rationales:
            teacher.run_sample_rationales(args)
            return 0
        if not args.dataset_dir:
            raise InputError("--evaluate needs --dataset_dir (a preprocess_pmc_vqa_for_sft.py output folder)")
        teacher.run_endpoint_evaluation(args)
        return 0
    if args.endpoint:
        raise InputError("--endpoint works with --sample_rationales and --evaluate")
    for flag in ("evaluate", "export_lm_eval"):
        if getattr(args, flag) and not args.dataset_dir:
            raise InputError(f"--{flag} needs --dataset_dir (a preprocess_pmc_vqa_for_sft.py output folder)")
    if args.serve:  # every serving flag is checked before anything is merged or loaded
        from pmcvqa_sft.infer import serving
        if not args.adapter:
            raise InputError("--serve needs --adapter (the training output folder to serve)")
        return serving.serve(args.adapter, args.model, args.engine, args.host, args.port, args.quantization,
                             args.serve_cache, args.served_model_name, args.ready_timeout,
                             args.max_request_bytes, args.max_prompt_tokens)
    if args.export_lm_eval:
        from pmcvqa_sft.evaluate import lm_eval as lm_eval_task
        lm_eval_task.export(args.export_lm_eval, args.dataset_dir, args.split, args.num_samples, args.model,
                            args.adapter, args.letter_only, args.task_name, args.overwrite)
        return 0
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.compare_base and not args.adapter:
        raise InputError("--compare_base needs --adapter (it compares the base model with the adapter)")
    from pmcvqa_sft.infer.generation import check_sampling
    check_sampling(args.temperature, args.top_p)

    from pmcvqa_sft.infer.answer import answer_question, conflict_note, normalize_choices
    from pmcvqa_sft.models import adapters as inference
    choices = normalize_choices(args.choices) if args.choices else None  # fail before loading
    if args.pacs:
        if args.image:
            raise InputError("--pacs takes its images from the PACS; drop --image")
        from pmcvqa_sft.infer import pacs as pacs_run
        return pacs_run.run(args)
    image = None
    if args.image:  # the figure is read and checked before the (slow) model load
        from pmcvqa_sft.data.figures import open_image
        window = None
        if args.window:
            from pmcvqa_sft.data.dicom import parse_window
            window = parse_window(args.window)
        image = open_image(args.image, frame=args.frame, window=window, log=print)
        if args.save_model_input:
            import os
            tmp = f"{args.save_model_input}.tmp-{os.getpid()}"
            image.save(tmp, format="PNG")
            os.replace(tmp, args.save_model_input)
            print(f"model input image written to {args.save_model_input}")
    if args.merge_and_save:
        if not args.adapter:
            raise InputError("--merge_and_save needs --adapter")
        inference.merge_and_save(args.adapter, args.merge_and_save, model=args.model, overwrite=args.overwrite)
        return 0

    if args.evaluate:  # check the dataset and the output folder before the slow model load
        from pmcvqa_sft.evaluate import accuracy as evaluation
        if args.output_dir:
            evaluation.check_output_dir(args.output_dir, args.overwrite)
        data = evaluation.load_eval_rows(args.dataset_dir, args.split, args.num_samples)
        loaded = inference.load_for_inference(args.model, args.adapter, args.quantization)
        # an image model reads its rows with the figure columns (and runs the blind ablation)
        evaluation.run_evaluation(loaded, args.dataset_dir, args.split, args.num_samples, args.batch_size,
                                  args.method, args.letter_only, args.max_new_tokens, args.output_dir,
                                  args.compare_base, args.overwrite, data=None if loaded.processor else data,
                                  blind=args.blind, images=args.images, max_pixels=args.max_pixels)
        return 0
    loaded = inference.load_for_inference(args.model, args.adapter, args.quantization)

    from pmcvqa_sft.format.media import card_max_pixels
    from pmcvqa_sft.infer import console
    from pmcvqa_sft.infer.generation import GenerationSettings
    settings = GenerationSettings.from_model(loaded.model, args.temperature, args.top_p, args.max_new_tokens,
                                             args.greedy)
    if args.interactive:
        return console.run_console(loaded.model, loaded.processor or loaded.tokenizer, settings,
                                   loaded.system_prompt, show_think=not args.hide_think,
                                   max_pixels=args.max_pixels or card_max_pixels(loaded.card))
    if args.demo:
        return console.run_demo(loaded.model, loaded.processor or loaded.tokenizer, settings, loaded.system_prompt,
                                max_pixels=args.max_pixels or card_max_pixels(loaded.card))
    ans = answer_question(args.question, choices, loaded.model, loaded.processor or loaded.tokenizer,
                          caption=args.caption, system_prompt=loaded.system_prompt,
                          greedy=not settings.do_sample, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=settings.max_new_tokens, image=image,
                          max_pixels=args.max_pixels or card_max_pixels(loaded.card))
    if args.json:
        print(json.dumps(ans.to_dict(), ensure_ascii=False, indent=2))
        return 0
    if ans.reasoning:
        print(f"reasoning: {ans.reasoning}")
    print(f"answer: {ans.letter + '. ' if ans.letter else ''}{ans.answer or '(no parseable answer)'}")
    note = conflict_note(ans, choices)
    if note:
        print(f"note: {note}")
    cut = "" if ans.finished else ", cut before the end (--max_new_tokens or the model's context)"
    print(f"({ans.n_tokens} tokens, {ans.seconds:.2f} s{cut})")
    return 0


if __name__ == "__main__":
    from pmcvqa_sft.core.errors import run_main
    run_main(main)
