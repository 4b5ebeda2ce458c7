"""train_sft_example.py: every bad input gets a one-line error (exit 2); DDP over 2 CPU processes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from test_train import ROOT, SCRIPT, script_env
from conftest import HANG_GUARD_S


def run_main_in_process(argv, capsys):
    """The script's main() under run_main, as the shell runs it: (exit code, stderr lines)."""
    import train_sft_example
    from pmcvqa_sft.core.errors import run_main
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: train_sft_example.main(argv))
    err = capsys.readouterr().err
    return exc.value.code, [line for line in err.splitlines() if line.strip()]


def one_line_error(code, lines, *needles):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def base_argv(processed_tiny, tiny_dir, tmp_path):
    return ["--model", str(tiny_dir), "--dataset_dir", str(processed_tiny), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--report_to", "none", "--no-progress"]


def test_unknown_quantization_subprocess(base_argv):
    r = subprocess.run([sys.executable, str(SCRIPT), *base_argv, "--quantization", "3bit"], env=script_env(),
                       capture_output=True, text=True)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    one_line_error(r.returncode, lines, "--quantization", "invalid choice: '3bit'", "'8bit', '4bit', 'none'")


def test_argparse_errors_are_one_line(base_argv, capsys):
    import train_sft_example
    for argv in (["--model", "tiny"], [*base_argv, "--max_steps", "many"]):
        with pytest.raises(SystemExit) as exc:
            train_sft_example.main(argv)
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        one_line_error(exc.value.code, lines)


def test_missing_or_foreign_dataset_folder(base_argv, tmp_path, capsys):
    argv = list(base_argv)
    i = argv.index("--dataset_dir") + 1
    argv[i] = str(tmp_path / "nope")
    one_line_error(*run_main_in_process(argv, capsys), "does not exist", "preprocess")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train.csv").write_text("a,b\n1,2\n")
    argv[i] = str(foreign)
    one_line_error(*run_main_in_process(argv, capsys), "not produced by preprocess")


def test_output_folder_holding_another_run(base_argv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_args.json").write_text("{}")
    (out / "checkpoint-5").mkdir()
    one_line_error(*run_main_in_process(base_argv, capsys), "already holds a training run", "--overwrite")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    argv = [*base_argv[:base_argv.index("--output_dir") + 1], str(other), *base_argv[base_argv.index("--output_dir") + 2:]]
    one_line_error(*run_main_in_process(argv + ["--overwrite"], capsys), "not a training run")
    one_line_error(*run_main_in_process(argv + ["--resume_from_checkpoint", "auto"], capsys), "holds files")
    assert (other / "notes.txt").read_text() == "mine"
    one_line_error(*run_main_in_process(base_argv + ["--resume_from_checkpoint", str(tmp_path / "ck")], capsys),
                   "not a complete Trainer checkpoint", "no such folder")


def test_dataset_built_with_another_tokenizer_is_refused(base_argv, processed_tiny, tmp_path, capsys):
    other = tmp_path / "other_tok"
    shutil.copytree(processed_tiny, other)
    report = json.loads((other / "preprocess_report.json").read_text())
    report["vocab_size"], report["template_hash"] = 128256, "0" * 64
    (other / "preprocess_report.json").write_text(json.dumps(report))
    argv = list(base_argv)
    argv[argv.index("--dataset_dir") + 1] = str(other)
    one_line_error(*run_main_in_process(argv, capsys), "another tokenizer or chat template", "vocab_size 128256")


def _retrained_tokenizer_model(tiny_dir, dest):
    """The tiny model whose tokenizer differs only in ids/merges: same size, template, specials, EOS."""
    shutil.copytree(tiny_dir, dest)
    tj = json.loads((dest / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    # swap the ids of two ordinary merged tokens and the ranks of two merges: what a BPE retrained on
    # other text does, invisible to vocab size, template hash and EOS id
    a, b = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 300][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    merges[0], merges[1] = merges[1], merges[0]
    (dest / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return dest


def test_dataset_from_a_retrained_tokenizer_of_the_same_size_is_refused(base_argv, processed_tiny, tiny_dir,
                                                                         tmp_path, capsys):
    from pmcvqa_sft.format import encoding
    from pmcvqa_sft.models.loading import load_tokenizer
    other_model = _retrained_tokenizer_model(tiny_dir, tmp_path / "retrained")
    mine, theirs = load_tokenizer(str(tiny_dir)), load_tokenizer(str(other_model))
    assert len(mine) == len(theirs) and mine.eos_token_id == theirs.eos_token_id
    assert encoding.template_hash(mine) == encoding.template_hash(theirs)
    report = json.loads((processed_tiny / "preprocess_report.json").read_text())
    want, got = report["tokenizer_hash"], encoding.tokenizer_hash(theirs)
    assert want == encoding.tokenizer_hash(mine) != got
    argv = list(base_argv)
    argv[argv.index("--model") + 1] = str(other_model)
    code, lines = run_main_in_process(argv, capsys)
    one_line_error(code, lines, "another tokenizer", f"tokenizer_hash {want} vs {got}")
    assert "vocab_size" not in lines[0] and "template_hash" not in lines[0]  # only the real difference


def test_report_without_tokenizer_hash_is_checked_on_the_rest(processed_tiny, tiny_dir, tiny_tokenizer, tmp_path):
    """Datasets preprocessed before the field existed still load with a matching model, and are still
    refused on the fields they do hold."""
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.train.run import check_dataset_matches
    report = json.loads((processed_tiny / "preprocess_report.json").read_text())
    del report["tokenizer_hash"]
    check_dataset_matches(report, tiny_tokenizer, "d", "m")  # no error
    with pytest.raises(InputError, match="eos_token_id 5 vs"):
        check_dataset_matches({**report, "eos_token_id": 5}, tiny_tokenizer, "d", "m")


def test_bitsandbytes_unusable(base_argv, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    one_line_error(*run_main_in_process(base_argv + ["--quantization", "4bit"], capsys),
                   "needs bitsandbytes", "pip install", "--quantization none")


def test_ddp_two_cpu_processes_see_disjoint_data(processed_tiny, tiny_dir, tmp_path):
    """`accelerate launch` with configs/ddp_cpu.yaml: 2 processes, gloo, 8-bit base (bitsandbytes' CPU
    backend works under DDP): completes, one adapter, the ranks trained on disjoint rows."""
    seen = tmp_path / "seen"
    out = tmp_path / "ddp"
    import socket
    with socket.socket() as sock:  # a free port, so parallel test runs don't collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "ddp_cpu.yaml"),
           "--main_process_port", str(port), str(SCRIPT),
           "--model", str(tiny_dir), "--dataset_dir", str(processed_tiny), "--output_dir", str(out),
           "--quantization", "8bit", "--max_steps", "3", "--per_device_train_batch_size", "4",
           "--gradient_accumulation_steps", "1", "--eval_steps", "3", "--max_samples", "48",
           "--max_eval_samples", "8", "--logging_steps", "1", "--no-gradient_checkpointing",
           "--report_to", "none", "--no-progress"]
    r = subprocess.run(cmd, env=script_env(PMCVQA_DEBUG_SEEN_ROWS=seen), capture_output=True, text=True,
                       cwd=ROOT, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (json.loads((seen / f"seen_rank{i}.json").read_text()) for i in (0, 1))
    assert len(rank0) == len(rank1) == 3 * 4
    assert not set(rank0) & set(rank1), (rank0, rank1)
    card = json.loads((out / "run_card.json").read_text())
    assert card["world_size"] == 2 and card["global_step"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("extra, needle", [
    (["--max_samples", "0"], "--max_samples must be at least 1"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
])
def test_out_of_range_options_are_one_line_errors(base_argv, capsys, extra, needle):
    one_line_error(*run_main_in_process([*base_argv, *extra], capsys), needle)


def test_flags_and_train_options_are_one_schema():
    """Every TrainOptions field is a flag with help; parsing just the required flag gives TrainOptions'
    own defaults; choices and --x/--no-x booleans come from the same table."""
    import dataclasses

    import train_sft_example
    from pmcvqa_sft.core.paths import DEFAULT_MODEL
    from pmcvqa_sft.models.loading import QUANTIZATIONS
    from pmcvqa_sft.train.options import TrainOptions, from_namespace
    ns = train_sft_example.parse_args(["--dataset_dir", "d"])
    assert from_namespace(ns) == TrainOptions(dataset_dir="d")
    assert set(vars(ns)) == {f.name for f in dataclasses.fields(TrainOptions)}
    assert TrainOptions(dataset_dir="d").model == DEFAULT_MODEL
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainOptions))
    flipped = train_sft_example.parse_args(["--dataset_dir", "d", "--no-progress", "--no-gradient_checkpointing",
                                            "--overwrite", "--quantization", "4bit", "--report_to", "none"])
    assert (flipped.progress, flipped.gradient_checkpointing, flipped.overwrite) == (False, False, True)
    from pmcvqa_sft.train.options import REPORT_TO
    for flag, choices in (("--quantization", QUANTIZATIONS), ("--report_to", REPORT_TO)):
        with pytest.raises(SystemExit):
            train_sft_example.parse_args(["--dataset_dir", "d", flag, "bogus"])
        for c in choices:
            train_sft_example.parse_args(["--dataset_dir", "d", flag, c])


def test_learning_rate_default_follows_the_stage():
    """LoRA GRPO at SFT's 2e-4 swings the policy away: --stage grpo defaults to 1e-5 (TRL #2872), and a
    given rate is kept for either stage; the resolved rate is what TrainOptions (the run card) holds."""
    import train_sft_example
    from pmcvqa_sft.train.grpo import grpo_config
    from pmcvqa_sft.train.options import from_namespace
    base = ["--dataset_dir", "d", "--output_dir", "o"]
    opts = lambda *extra: from_namespace(train_sft_example.parse_args([*base, *extra]))  # noqa: E731
    assert opts().learning_rate == 2e-4
    assert opts("--stage", "grpo").learning_rate == 1e-5
    assert opts("--stage", "grpo", "--learning_rate", "3e-4").learning_rate == 3e-4
    assert opts("--learning_rate", "1e-3").learning_rate == 1e-3
    o = opts("--stage", "grpo", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
             "--max_steps", "1", "--report_to", "none")
    assert grpo_config(o, [1.0, 0.1], has_eval=False).learning_rate == 1e-5
