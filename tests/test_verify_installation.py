"""verify_installation.py: the script end to end (offline, with --smoke) and each check's logic.

The end-to-end run happens once (module fixture, ~30-45 s on 2 cores: torch import, real bitsandbytes
matmuls, the tiny-model smoke test); the other tests call the checks in-process with fakes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pmcvqa_sft.verify import environment as env
from pmcvqa_sft.core.errors import InputError
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "verify_installation.py"
SECRET = "hf_secret123"


def run_script(*args, extra_env=None, timeout=HANG_GUARD_S):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    e.update(extra_env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tiny_dir, tmp_path_factory):
    """One full offline run with --smoke, a hub token in the environment and a JSON report."""
    report = tmp_path_factory.mktemp("verify") / "report.json"
    start = time.monotonic()
    proc = run_script("--smoke", "--json", str(report), "--output_dir", str(report.parent),
                      extra_env={"HF_TOKEN": SECRET})
    return proc, report, time.monotonic() - start


# ---- the script end to end ----

def test_full_offline_run_passes_with_warnings(smoke_run):
    proc = smoke_run[0]
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in out and "ready" in out
    for line in ("✓ transformers", "✓ bitsandbytes 8-bit", "✓ bitsandbytes 4-bit", "✓ RAM", "✓ disk"):
        assert line in out, line
    # offline hub: a warning naming the offline alternative, reported without waiting for a timeout
    assert "! hub" in out and "HF_HUB_OFFLINE=1" in out and "--model tiny" in out
    assert "! device" in out and "CPU only" in out and "16 GB" in out  # no GPU: said, not failed


def test_smoke_trains_and_generates(smoke_run):
    out = smoke_run[0].stdout
    assert "✓ smoke: training" in out and "✓ smoke: generation" in out
    line = next(l for l in out.splitlines() if "smoke: training" in l)
    first, last = (float(x) for x in line.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first


def test_token_is_never_printed(smoke_run):
    proc, report, _ = smoke_run
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET not in report.read_text()
    assert any("hub token" in l and "set" in l and "not set" not in l for l in proc.stdout.splitlines())


def test_json_report_matches_table(smoke_run):
    proc, report, _ = smoke_run
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["failed"] == 0 and data["smoke"] is True
    names = {c["name"]: c for c in data["checks"]}
    assert names["bitsandbytes 8-bit"]["status"] == "pass"
    assert names["hub"]["status"] == "warn" and names["hub"]["fix"]
    assert sum(c["status"] == "pass" for c in data["checks"]) == data["passed"]


def test_too_old_and_missing_packages_fail_with_their_fix(tmp_path):
    req = tmp_path / "req.txt"
    (tmp_path / "base.txt").write_text("packaging>=20\n")
    req.write_text("# comment\n\n-r base.txt\n--extra-index-url https://example.invalid/simple\n"
                   "transformers>=99.0,<100  # far future\n"
                   "no-such-package-pmcvqa>=1.0\n"
                   "pytest>=1 ; python_version < '3'\n")  # marker does not apply: skipped
    proc = run_script("--minimal", "--requirements", str(req))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "✓ packaging" in out
    assert "✗ transformers" in out and "need >=99.0,<100" in out
    assert "fix: pip install 'transformers>=99.0,<100'" in out
    assert "✗ no-such-package-pmcvqa" in out and "not installed" in out and "pip install -r req.txt" in out
    assert "pytest" not in out
    assert "bitsandbytes" not in out  # --minimal: no torch / bitsandbytes checks
    assert "2 failed" in out and "not ready" in out


@pytest.mark.parametrize("argv, message", [
    (["--minimal", "--smoke"], "--smoke needs the full install"),
    (["--requirements", "/nonexistent/req.txt", "--minimal"], "not found"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    import verify_installation
    with pytest.raises(InputError, match=message):
        verify_installation.main(argv)


def test_existing_json_needs_overwrite(tmp_path):
    import verify_installation
    report = tmp_path / "r.json"
    report.write_text("{}")
    with pytest.raises(InputError, match="--overwrite"):
        verify_installation.main(["--minimal", "--json", str(report)])
    assert report.read_text() == "{}"


def test_bad_requirement_line_names_file_and_line(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("torch>=2\nthis is not a requirement!\n")
    with pytest.raises(InputError, match=r"req.txt', line 2"):
        env.read_requirements(req)


# ---- the checks, in-process ----

@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_matmul_on_cpu(bits):
    (row,) = env.check_bnb_matmul(bits)
    assert row.status == env.PASS, row
    err = float(row.detail.split("relative error ")[1].split("%")[0]) / 100
    assert 0 < err <= env.BNB_TOLERANCE[bits]  # quantized: some error, within tolerance


def test_bitsandbytes_check_catches_a_wrong_result(monkeypatch):
    real = env._quantized_layer

    def broken(bits, weight, device):  # a kernel that returns garbage: quantize the wrong matrix
        return real(bits, weight.flip(0), device)
    monkeypatch.setattr(env, "_quantized_layer", broken)
    (row,) = env.check_bnb_matmul(8)
    assert row.status == env.FAIL and "bitsandbytes" in row.fix


def _fake_cuda(monkeypatch, total_gb, bf16=True):
    import torch
    props = SimpleNamespace(name="Fake GPU", total_memory=int(total_gb * 1e9), major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(total_gb * 0.9e9), int(total_gb * 1e9)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)


@pytest.mark.parametrize("total_gb, status, expect", [
    (80, env.PASS, "8bit, 4bit"), (24, env.PASS, "none, 8bit, 4bit"), (16, env.PASS, "8bit, 4bit"),
    (12, env.WARN, "--quantization 4bit"), (8, env.WARN, "bigger GPU")])
def test_gpu_memory_thresholds(monkeypatch, total_gb, status, expect):
    _fake_cuda(monkeypatch, total_gb)
    rows = {r.name: r for r in env.check_device()}
    assert "compute capability 7.5" in rows["device"].detail
    assert rows["GPU memory"].status == status
    assert expect in rows["GPU memory"].detail + rows["GPU memory"].fix


def test_gpu_without_bf16_warns(monkeypatch):
    _fake_cuda(monkeypatch, 16, bf16=False)
    rows = {r.name: r for r in env.check_device()}
    assert rows["bf16"].status == env.WARN and "8bit or 4bit" in rows["bf16"].fix


def test_unreachable_hub_is_a_fast_warning(monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(env, "HUB_TIMEOUT_S", 0.2)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def hanging_dns(*a, **k):  # a lookup that never answers (until the test releases it)
        started.set()
        release.wait(120)
        finished.set()
    monkeypatch.setattr(huggingface_hub, "model_info", hanging_dns)
    try:
        hub, token = env.check_hub("some/model")
        # the check gave up on the deadline: it returned while the lookup was still hanging
        assert started.is_set() and not finished.is_set()
    finally:
        release.set()
    assert hub.status == env.WARN and "unreachable" in hub.detail and "--model tiny" in hub.fix
    assert token.status == env.PASS


def test_gated_model_without_token_fails_with_login_fix(monkeypatch):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: SimpleNamespace(gated="manual"))
    monkeypatch.setattr(env, "hub_token", lambda: None)
    hub, token = env.check_hub("some/gated")
    assert hub.status == env.PASS
    assert token.status == env.FAIL and "HF_TOKEN" in token.fix and "hf auth login" in token.fix
    monkeypatch.setattr(env, "hub_token", lambda: SECRET)
    _, token = env.check_hub("some/gated")
    assert token.status == env.PASS and token.detail == "set"


def test_redact_hides_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert SECRET not in env.redact(f"401 for Authorization: Bearer {SECRET}")


def test_disk_thresholds(monkeypatch, tmp_path):
    def free(gb):
        monkeypatch.setattr(env.shutil, "disk_usage", lambda p: SimpleNamespace(free=int(gb * 1e9)))
        return {r.status: r for r in env.check_disk(tmp_path / "cache", tmp_path / "out")}
    assert env.PASS in free(100)
    warn = free(20)[env.WARN]
    assert "~40 GB" in warn.detail and f"free 20 GB at {tmp_path / 'cache'}" in warn.fix
    fail = free(0.2)[env.FAIL]
    assert fail.fix.startswith("free 0.8 GB at")


def test_ram_thresholds(monkeypatch):
    for gb, status in ((64, env.PASS), (15.5, env.PASS), (8, env.WARN), (1, env.FAIL)):
        monkeypatch.setattr(env, "total_ram_bytes", lambda gb=gb: int(gb * 1e9))
        (row,) = env.check_ram()
        assert row.status == status, (gb, row)


def test_a_crashing_check_becomes_a_failed_row():
    def boom():
        raise RuntimeError("CUDA driver version is insufficient")
    (row,) = env.guarded("device", boom, "reinstall")
    assert row.status == env.FAIL and "insufficient" in row.detail and row.fix == "reinstall"
