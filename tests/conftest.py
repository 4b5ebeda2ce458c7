"""Shared pytest fixtures: the embedded tiny model, the bundled sample, the real-tokenizer fixtures.

The fixtures folder (../shared/fixtures beside the repo) exists for developers and CI only; tests that
need it skip with a visible reason when it is absent (a user's clone).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")        # before torch loads: the scripts' subprocesses too
from pmcvqa_sft.core.threads import configure_threads

configure_threads("tiny")  # the rule every script uses: one torch thread for the tiny model (threads.py)

HANG_GUARD_S = 1200  # subprocess timeouts in tests: only against a hang, far above a busy machine's time
FIXTURES = ROOT.parent / "shared" / "fixtures"
REAL_TOKENIZER = FIXTURES / "deepseek_r1_distill_llama_8b_tokenizer"
REAL_MODEL_FILES = FIXTURES / "deepseek_r1_distill_llama_8b"
SAMPLE_DIR = ROOT / "data" / "sample"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The embedded tiny model folder (built once, cached under artifacts/)."""
    from pmcvqa_sft.models.tiny import ensure_tiny
    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from pmcvqa_sft.models.loading import load_tokenizer
    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="session")
def real_tokenizer():
    """The faithful 128,256-token stand-in for the DeepSeek-R1-Distill-Llama-8B tokenizer."""
    if not REAL_TOKENIZER.is_dir():
        pytest.skip(f"real-tokenizer fixture absent ({REAL_TOKENIZER}); fidelity test skipped")
    from pmcvqa_sft.models.loading import load_tokenizer
    return load_tokenizer(str(REAL_TOKENIZER))


@pytest.fixture(scope="session")
def processed_tiny(tmp_path_factory, tiny_dir) -> Path:
    """The bundled sample preprocessed with the tiny tokenizer (train/validation/test)."""
    from pmcvqa_sft.preprocess.run import run_preprocess
    out = tmp_path_factory.mktemp("processed") / "pmc_vqa_tiny"
    run_preprocess(data=str(SAMPLE_DIR), tokenizer_name=str(tiny_dir), output_dir=str(out))
    return out


@pytest.fixture()
def one_thread():
    """One intra-op thread: on a busy 2-core machine two spinning OpenMP threads are 5-30x slower
    (bench/bench_threads.py). Restores the previous count after the test."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VISION_SAMPLE_DIR = ROOT / "data" / "sample_vision"


@pytest.fixture(scope="session")
def processed_vision(tmp_path_factory) -> Path:
    """The bundled image sample preprocessed for the embedded tiny Qwen2.5-VL (figures read from the zip)."""
    import preprocess_pmc_vqa_for_sft as pre
    out = tmp_path_factory.mktemp("processed") / "pmc_vqa_vision"
    assert pre.main(["--data", str(VISION_SAMPLE_DIR), "--images", str(VISION_SAMPLE_DIR / "images_2.zip"),
                     "--tokenizer", "tiny-vision", "--output_dir", str(out)]) == 0
    return out


VISION_STEPS = 40  # enough for an adapter whose answers depend on the figure; accuracy is not the point here


@pytest.fixture(scope="session")
def vision_run(tmp_path_factory):
    """A make-demo-vision-shaped run folder (RUN/data, RUN/model) at a reduced size: the tiny image model's
    quick adapter, trained once per session (tests/test_serving_vision.py, tests/test_rationales_vision.py)."""
    import subprocess

    from tests.test_serving import ENV_1T, HANG_GUARD
    run = tmp_path_factory.mktemp("vision-run")
    for args in (["preprocess_pmc_vqa_for_sft.py", "--data", str(VISION_SAMPLE_DIR), "--images",
                  str(VISION_SAMPLE_DIR / "images_2.zip"), "--tokenizer", "tiny-vision",
                  "--output_dir", str(run / "data")],
                 ["train_sft_example.py", "--model", "tiny-vision", "--dataset_dir", str(run / "data"),
                  "--output_dir", str(run / "model"), "--quantization", "none", "--train_vision", "merger",
                  "--max_steps", str(VISION_STEPS), "--learning_rate", "2e-3", "--per_device_train_batch_size", "16",
                  "--no-gradient_checkpointing", "--report_to", "none", "--no-progress"]):
        out = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV_1T, capture_output=True, text=True,
                             timeout=HANG_GUARD)
        assert out.returncode == 0, out.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def served_vision(vision_run, tmp_path_factory):
    """`--adapter RUN --serve` (the run folder, as make demo-vision prints it): one server for the session."""
    from tests.test_serving import HANG_GUARD, _free_port, _need, _Server
    _need("openai", "fastapi", "uvicorn")
    srv = _Server(["--adapter", str(vision_run), "--serve", "--port", str(_free_port()), "--serve_cache",
                   str(tmp_path_factory.mktemp("serve-cache")), "--ready_timeout", str(HANG_GUARD)])
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


# ---- a real Orthanc (session-wide) holding the synthetic DICOM objects (tests/test_pacs_orthanc.py) ----
# Orthanc missing: a failure in CI (CI set) or as root (`make test` installs it there); a visible skip
# with the install line otherwise.
from pmcvqa_sft.data import dicom_samples  # noqa: E402
from pmcvqa_sft.data import pacs as pacs_mod  # noqa: E402
from pmcvqa_sft.verify import orthanc as orthanc_mod  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid  # noqa: E402


def _require_orthanc():
    if orthanc_mod.find_orthanc():
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Orthanc tests: {orthanc_mod.INSTALL_HINT}")
    if os.geteuid() == 0:
        pytest.fail(f"running as root, so `make test` installs Orthanc: {orthanc_mod.INSTALL_HINT}")
    pytest.skip(orthanc_mod.INSTALL_HINT)


@pytest.fixture(scope="session")
def orthanc():
    _require_orthanc()
    # A new folder under /tmp (removed afterwards): pytest's tmp_path is closed to `nobody`.
    with orthanc_mod.orthanc_server() as server:
        yield server


@pytest.fixture(scope="session")
def study(orthanc):
    """The synthetic study stored once: name -> dataset (as stored)."""
    uid = generate_uid()
    objects = {
        "ct": dicom_samples.ct_slice(study_uid=uid),
        "cr": dicom_samples.xray_monochrome1(study_uid=uid),
        "multiframe": dicom_samples.multiframe(study_uid=uid),
        "ct_j2k": dicom_samples.compress(dicom_samples.ct_slice(study_uid=uid), JPEG2000Lossless),
        "cr_jpegls": dicom_samples.compress(dicom_samples.xray_monochrome1(study_uid=uid), JPEGLSLossless),
        "pdf": dicom_samples.encapsulated_pdf(study_uid=uid),
        "huge": dicom_samples.huge_multiframe_header(study_uid=uid),
    }
    os.environ.update({pacs_mod.ENV_USER: orthanc.user, pacs_mod.ENV_PASSWORD: orthanc.password})
    try:
        client = pacs_mod.connect(orthanc.dicomweb_url)
        for ds in objects.values():
            client.store(ds)
    finally:
        for key in (pacs_mod.ENV_USER, pacs_mod.ENV_PASSWORD):
            os.environ.pop(key, None)
    return {"uid": uid, **objects}


@pytest.fixture
def creds(orthanc, monkeypatch, tmp_path):
    """The admin credentials in the environment (and no stray netrc/token)."""
    for key in (pacs_mod.ENV_TOKEN, pacs_mod.ENV_NETRC):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc of the machine's user
    monkeypatch.setenv(pacs_mod.ENV_USER, orthanc.user)
    monkeypatch.setenv(pacs_mod.ENV_PASSWORD, orthanc.password)
    return orthanc


@pytest.fixture
def client(creds):
    return pacs_mod.connect(creds.dicomweb_url)
