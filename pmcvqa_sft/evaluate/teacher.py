"""The two endpoint jobs of inference_example.py: `--sample_rationales` (from a local model or an
endpoint) and `--evaluate --endpoint` (an OpenAI-compatible model scored like a local run)."""
from __future__ import annotations

from ..core.errors import InputError
from ..infer.generation import check_sampling
from .accuracy import dataset_prompt_settings, load_eval_rows

DEFAULT_RATIONALE_TOKENS = 2048
DEFAULT_ENDPOINT_EVAL_TOKENS = 96


def _rows(args, image_rows: bool):
    extra = ("image",) if image_rows else ()
    return load_eval_rows(args.dataset_dir, args.split, args.num_samples, extra_columns=extra,
                          missing_hint="; rerun preprocess_pmc_vqa_for_sft.py with --images")


def _endpoint_rows(args):
    from ..data.figures import figure_loader
    _, report = load_eval_rows(args.dataset_dir, args.split, 1)
    image = report.get("model_kind") == "vision"
    rows, report = _rows(args, image)
    return rows, report, figure_loader(report, args.images, args.dataset_dir) if image else None


def check_endpoint_args(args) -> None:
    if args.endpoint and not args.endpoint_model:
        raise InputError("--endpoint needs --endpoint_model (the model name the server serves)")
    if args.endpoint and (args.model or args.adapter):
        raise InputError("--endpoint replaces --model/--adapter: pass one or the other")
    if args.concurrency < 1:
        raise InputError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.samples < 1:
        raise InputError(f"--samples must be at least 1, got {args.samples}")


def run_sample_rationales(args) -> dict:
    """Rejection sampling over one split; prints and returns the report (evaluate.rationales)."""
    from .rationales import format_rationale_report, local_sampler, report_path, sample_rationales
    if not args.dataset_dir:
        raise InputError("--sample_rationales needs --dataset_dir (a preprocess_pmc_vqa_for_sft.py output folder)")
    check_endpoint_args(args)
    check_sampling(args.temperature, args.top_p)
    temperature = 0.6 if args.temperature is None else args.temperature
    top_p = 0.95 if args.top_p is None else args.top_p
    budget = args.max_new_tokens or DEFAULT_RATIONALE_TOKENS
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": budget, "samples": args.samples,
                "split": args.split}
    if args.endpoint:
        from .endpoint import endpoint_sampler, make_client
        rows, report, load = _endpoint_rows(args)
        sp, include_caption = dataset_prompt_settings(report)
        tokenizer, tokenizer_name = dataset_tokenizer(report, args.dataset_dir)
        sampler = endpoint_sampler(make_client(args.endpoint), args.endpoint_model, args.samples, temperature,
                                   top_p, budget, include_caption, load, args.endpoint_retries, system_prompt=sp)
        teacher = f"endpoint:{args.endpoint_model}"
    else:
        from ..data.store import check_model_kind
        from ..infer.generation import GenerationSettings
        from ..models.adapters import load_for_inference
        from .accuracy import figure_collator, use_trained_prompts
        loaded = load_for_inference(args.model, args.adapter, args.quantization)
        vision = loaded.processor is not None
        rows, report = _rows(args, vision)
        check_model_kind(report, vision, args.dataset_dir, loaded.base)
        collator = figure_collator(loaded, report, args.dataset_dir, args.images, args.max_pixels) if vision else None
        if not vision:  # image rows are evaluated with their stored prompts, as --evaluate does
            sp, cap = dataset_prompt_settings(report, loaded.system_prompt)
            use_trained_prompts(rows, report, loaded.tokenizer, sp, cap, log=lambda *_: None)
        if rows[0].get("prompt_ids") is None:
            raise InputError(f"dataset '{args.dataset_dir}' was made with another tokenizer or chat template "
                             "than this model; preprocess it with this model's tokenizer")
        gs = GenerationSettings(do_sample=temperature > 0, temperature=temperature, top_p=top_p,
                                max_new_tokens=budget)  # --temperature 0: greedy
        sampler = local_sampler(loaded.model, loaded.tokenizer, gs, args.samples, collator)
        teacher = f"local:{args.adapter or args.model}"
        tokenizer, tokenizer_name = loaded.tokenizer, f"the model ({args.adapter or args.model})"
    rep = sample_rationales(rows, sampler, args.sample_rationales, args.samples, teacher, settings, tokenizer,
                            tokenizer_name)
    print(format_rationale_report(rep))
    print(f"wrote {args.sample_rationales} and {report_path(args.sample_rationales)}")
    return rep


def dataset_tokenizer(report: dict, dataset_dir):
    """(tokenizer, its name for the report) the dataset was preprocessed with: it counts an endpoint's
    reasoning tokens. (None, None) with a note when it cannot be loaded (then they are not counted)."""
    from ..models.loading import load_tokenizer
    name = report.get("tokenizer")
    for candidate in dict.fromkeys(x for x in (name, report.get("tokenizer_path")) if x):
        try:
            return load_tokenizer(candidate), f"the dataset ({candidate})"
        except InputError:
            continue
    print(f"note: the tokenizer of dataset '{dataset_dir}' ({name or 'not recorded'}) could not be loaded: "
          "reasoning tokens are not counted")
    return None, None


def run_endpoint_evaluation(args) -> dict:
    from .endpoint import evaluate_endpoint, make_client
    from .metrics import format_report, majority_baseline
    check_endpoint_args(args)
    if not args.output_dir:
        raise InputError("--evaluate --endpoint needs --output_dir (its predictions file makes a rerun resume)")
    if args.method != "generate":
        raise InputError("--endpoint evaluates with --method generate (an endpoint gives no log-likelihoods)")
    rows, report, load = _endpoint_rows(args)
    sp, cap = dataset_prompt_settings(report)
    tok, tok_name = dataset_tokenizer(report, args.dataset_dir)  # counts reasoning tokens as a local run does
    m = evaluate_endpoint(make_client(args.endpoint), args.endpoint_model, rows, args.output_dir, cap,
                          args.max_new_tokens or DEFAULT_ENDPOINT_EVAL_TOKENS, args.concurrency,
                          0.0 if args.temperature is None else args.temperature,
                          1.0 if args.top_p is None else args.top_p, load, args.endpoint_retries,
                          system_prompt=sp, tokenizer=tok, tokenizer_name=tok_name)
    print(format_report({f"endpoint:{args.endpoint_model}": m}, majority_baseline(rows)))
    print(f"endpoint failures (after {args.endpoint_retries} retries): {m['endpoint_failures']}; "
          f"wrote {args.output_dir}/predictions.jsonl and metrics.json")
    return m
