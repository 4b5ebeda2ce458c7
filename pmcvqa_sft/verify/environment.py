"""Installation checks behind `verify_installation.py`: each check returns `Check` rows (✓ / ! / ✗).

Status meanings: PASS; WARN (works, but not for everything: no GPU, offline hub, too little disk for the
8B model - the tiny demo still runs); FAIL (something the toolkit needs is broken). Every row that is not
a pass carries its fix. Nothing here prints the hub token: rows say "set" / "not set", and `redact()`
scrubs the token's value from any text that leaves this module (exception messages included).
"""
from __future__ import annotations

import os
from pathlib import Path
import platform
import shutil
import sys
import threading
import time

from ..core.errors import InputError
from ..core.paths import ROOT
from .checks import FAIL, INSTALL_FIX, PASS, WARN, Check, guarded

REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_MINIMAL = ROOT / "requirements-minimal.txt"

# ---- what the real run (DeepSeek-R1-Distill-Llama-8B, 8.03 B parameters) needs ----
# Sizes in GB = 1e9 bytes, as model cards and disk tools print them.
MIN_PYTHON = (3, 10)          # torch, datasets, peft: >= 3.10 (newest transformers 5: 3.11, pip picks a fit)
MODEL_DOWNLOAD_GB = 16        # the bf16 safetensors: 8.03e9 parameters x 2 bytes
DISK_RECOMMENDED_GB = 40      # weights 16 + checkpoints (adapter + optimizer state, ~0.5 GB each) + PMC-VQA
                              # CSVs and processed datasets (~2 GB) + room for a merged copy (another 16)
GPU_MIN_GB = {                # GPU memory for LoRA training at seq 512, batch 1-2, gradient checkpointing:
    "none": 24,               #   bf16 weights 16 GB + LoRA, optimizer and activations
    "8bit": 16,               #   int8 weights ~8.5 GB -> ~10-12 GB with activations (the default)
    "4bit": 10,               #   NF4 weights ~5.5 GB -> ~7-8 GB with activations
}
RAM_MIN_GB = 16               # shards pass through CPU memory while loading; datasets and tokenizers too
MEMORY_SLACK = 0.9            # cards and machines sold as "16 GB" report a little less (a T4: 15.8 GB)
DEMO_DISK_MIN_GB = 1          # the tiny model, the sample and a demo run fit in well under 1 GB
DEMO_RAM_MIN_GB = 2
HUB_TIMEOUT_S = 5
# bitsandbytes round trip: fp32 reference vs. quantized layer, relative error (measured: 8-bit ~0.5 %,
# NF4 ~9 % on random normal weights; a broken kernel gives ~100 %).
BNB_TOLERANCE = {8: 0.03, 4: 0.2}

OFFLINE_FIX = ("pass --model tiny to run offline (the embedded model; --data data/sample for the bundled "
               "sample), or pass local folders to --model / --tokenizer")


def _gb(n_bytes: float) -> float:
    return n_bytes / 1e9


def hub_token() -> str | None:
    """The hub token if one is configured (env or `hf auth login`); never shown, only tested and redacted."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:
        return None


def redact(text: str) -> str:
    token = hub_token()
    return text.replace(token, "***") if token and len(token) >= 4 else text


# ---- Python and packages ----

def read_requirements(path) -> list:
    """`packaging` Requirements from a pip requirements file; `-r other.txt` followed; markers applied.

    Other pip options (`--extra-index-url`, `-e .`) are skipped: they say where to install from, not what.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    path = Path(path)
    if not path.is_file():
        raise InputError(f"requirements file '{path}' not found")
    out = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            out += read_requirements(path.parent / line.split(None, 1)[1])
            continue
        if line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise InputError(f"file '{path}', line {n}: not a requirement ({exc})") from None
        if req.marker is None or req.marker.evaluate():
            out.append(req)
    return out


def check_python() -> list[Check]:
    v = sys.version_info
    ok = (v.major, v.minor) >= MIN_PYTHON
    need = ".".join(map(str, MIN_PYTHON))
    return [Check("python", PASS if ok else FAIL, f"{platform.python_version()} (need >= {need})",
                  "" if ok else f"use Python >= {need}: make a fresh venv with it, then {INSTALL_FIX}")]


def spec_text(specifier) -> str:
    """`>=5.0,<6` in reading order (packaging sorts `<6,>=5.0`)."""
    rank = {">=": 0, ">": 0, "~=": 0, "==": 0, "===": 0, "!=": 1, "<": 2, "<=": 2}
    return ",".join(str(s) for s in sorted(specifier, key=lambda s: (rank.get(s.operator, 1), s.version)))


def check_requirement(req, requirements_file: str = "requirements.txt") -> Check:
    """One requirement against the installed distribution (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version
    spec = spec_text(req.specifier) or "any version"
    pinned = f"pip install '{req.name}{spec_text(req.specifier)}'"
    if req.name.lower() == "torch":  # the CUDA build must come from the PyTorch index, not plain PyPI
        pinned = ("pip install torch from the PyTorch index for your CUDA (CPU: "
                  f"pip install '{req.name}{spec_text(req.specifier)}'), then pip install -r {requirements_file}")
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        fix = pinned if req.name.lower() == "torch" else f"pip install -r {requirements_file}"
        return Check(req.name, FAIL, f"not installed (need {spec})", fix)
    try:
        ok = req.specifier.contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return Check(req.name, WARN, f"{installed}: not a standard version, cannot compare with {spec}", pinned)
    return Check(req.name, PASS if ok else FAIL, f"{installed} ({spec})" if ok else f"{installed}, need {spec}",
                 "" if ok else pinned)


# ---- torch device, bf16, bitsandbytes ----

def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def check_device() -> list[Check]:
    import torch
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"cuda:{i} {p.name}, {_gb(p.total_memory):.1f} GB, compute capability {p.major}.{p.minor}")
        rows = [Check("device", PASS, f"CUDA {torch.version.cuda}: " + "; ".join(gpus))]
        total = torch.cuda.get_device_properties(0).total_memory
        free = torch.cuda.mem_get_info(0)[0]
        fits = [q for q, need in GPU_MIN_GB.items() if _gb(total) >= need * MEMORY_SLACK]
        detail = f"cuda:0 {_gb(total):.1f} GB total, {_gb(free):.1f} GB free"
        if "8bit" in fits:
            rows.append(Check("GPU memory", PASS, f"{detail}: the 8B model fits --quantization "
                              + ", ".join(fits)))
        elif "4bit" in fits:
            rows.append(Check("GPU memory", WARN, f"{detail}: below {GPU_MIN_GB['8bit']} GB for 8-bit",
                              f"pass --quantization 4bit (needs >= {GPU_MIN_GB['4bit']} GB)"))
        else:
            rows.append(Check("GPU memory", WARN, f"{detail}: the 8B model needs >= {GPU_MIN_GB['4bit']} GB "
                              "(4-bit)", "use a bigger GPU for the 8B run; --model tiny runs here"))
        if torch.cuda.is_bf16_supported():
            rows.append(Check("bf16", PASS, "supported: compute in bf16"))
        else:
            rows.append(Check("bf16", WARN, "not supported by this GPU (pre-Ampere): compute runs in fp32, "
                              f"so --quantization none needs ~{2 * GPU_MIN_GB['none']} GB",
                              "keep --quantization 8bit or 4bit"))
        return rows
    need = f"an 8B run needs a CUDA GPU with >= {GPU_MIN_GB['8bit']} GB (8-bit)"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return [Check("device", WARN, f"Apple MPS: fine for the tiny demo; {need}",
                      "for the 8B run use a machine with a CUDA GPU; here pass --model tiny"),
                Check("bf16", PASS, "not used on MPS: compute in fp32")]
    rows = [Check("device", WARN, f"CPU only ({os.cpu_count()} cores): fine for the tiny demo; {need}",
                  "for the 8B run use a machine with a CUDA GPU; here pass --model tiny")]
    if torch.version.cuda is None and _nvidia_driver_present():
        rows[0] = Check("device", FAIL, f"an NVIDIA driver is present but torch {torch.__version__} is a CPU "
                        "build", "pip install torch from the PyTorch index for your CUDA, then "
                        f"{INSTALL_FIX}")
    rows.append(Check("bf16", PASS, "not used on the CPU: compute in fp32"))
    return rows


def _quantized_layer(bits: int, weight, device):
    """A bitsandbytes Linear holding `weight`; moving it to `device` is what quantizes it."""
    import bitsandbytes as bnb

    from ..models.loading import compute_dtype
    out_f, in_f = weight.shape
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype(), quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    return layer.to(device)


def check_bnb_matmul(bits: int, bnb_spec: str = ">=0.45") -> list[Check]:
    """A real int8 / NF4 matmul on the device the run uses, compared with fp32."""
    import torch

    from ..core.notices import quiet_bitsandbytes
    quiet_bitsandbytes()
    from ..models.loading import device_map_for_process
    name = f"bitsandbytes {bits}-bit"
    fix = (f"pip install 'bitsandbytes{bnb_spec}' (`python -m bitsandbytes` shows what it found), "
           "or pass --quantization none")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return [Check(name, FAIL, f"import failed: {type(exc).__name__}: {exc}", fix)]
    device = device_map_for_process()[""]
    device = f"cuda:{device}" if isinstance(device, int) else device
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=gen)
    x = torch.randn(16, 256, generator=gen)
    ref = x @ weight.T
    layer = _quantized_layer(bits, weight, device)
    stored = layer.weight.dtype
    if stored not in (torch.int8, torch.uint8):  # a silent fp fallback would pass the error test
        return [Check(name, FAIL, f"weights stayed {stored} on {device}: not quantized", fix)]
    if bits == 4:
        dtype = layer.compute_dtype
    else:  # the CUDA int8 kernel takes fp16 activations; the CPU path fp32
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    x_in = x.to(device, dtype)
    with torch.no_grad():
        y = layer(x_in).float().cpu()
    err = ((y - ref).norm() / ref.norm()).item()
    ok = err <= BNB_TOLERANCE[bits]
    kind = "int8" if bits == 8 else "NF4"
    detail = f"{kind} matmul on {device}: relative error {err:.2%} (tolerance {BNB_TOLERANCE[bits]:.0%})"
    return [Check(name, PASS if ok else FAIL, detail, "" if ok else fix)]


# ---- disk, memory ----

def _existing(path: Path) -> Path:
    path = path.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_row(name: str, paths: list[Path], need_gb: float, what: str) -> Check:
    shown = " and ".join(str(p) for p in paths)
    free = _gb(shutil.disk_usage(_existing(paths[0])).free)
    detail = f"{free:.0f} GB free at {shown}"
    if free < DEMO_DISK_MIN_GB:
        return Check(name, FAIL, detail, f"free {DEMO_DISK_MIN_GB - free:.1f} GB at {paths[0]}")
    if free < need_gb:
        return Check(name, WARN, f"{detail}; the 8B run needs ~{need_gb} GB ({what})",
                     f"free {need_gb - free:.0f} GB at {paths[0]} for the 8B run, or point it at a bigger disk")
    return Check(name, PASS, f"{detail} (8B run: ~{need_gb} GB, {what})")


def check_disk(cache_dir, output_dir) -> list[Check]:
    cache, out = Path(cache_dir).expanduser(), Path(output_dir).expanduser()
    if os.stat(_existing(cache)).st_dev == os.stat(_existing(out)).st_dev:
        return [_disk_row("disk", [cache, out], DISK_RECOMMENDED_GB,
                          f"{MODEL_DOWNLOAD_GB} GB bf16 weights + checkpoints + datasets")]
    return [_disk_row("disk (cache)", [cache], MODEL_DOWNLOAD_GB + 2, f"{MODEL_DOWNLOAD_GB} GB weights + PMC-VQA"),
            _disk_row("disk (output)", [out], DISK_RECOMMENDED_GB - MODEL_DOWNLOAD_GB,
                      "checkpoints, processed datasets, a merged copy")]


def total_ram_bytes() -> int:
    try:
        import psutil
        return psutil.virtual_memory().total
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_ram() -> list[Check]:
    total = _gb(total_ram_bytes())
    detail = f"{total:.1f} GB"
    if total < DEMO_RAM_MIN_GB:
        return [Check("RAM", FAIL, f"{detail}: below the {DEMO_RAM_MIN_GB} GB the demo needs", "use a bigger machine")]
    if total < RAM_MIN_GB * MEMORY_SLACK:
        return [Check("RAM", WARN, f"{detail}; the 8B run needs >= {RAM_MIN_GB} GB",
                      f"use a machine with >= {RAM_MIN_GB} GB RAM for the 8B run")]
    return [Check("RAM", PASS, f"{detail} (8B run: >= {RAM_MIN_GB} GB)")]


# ---- the hub ----

def _with_deadline(fn, seconds: float):
    """fn() in a daemon thread; TimeoutError after `seconds` (DNS lookups ignore HTTP timeouts)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer in {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_hub(model_id: str) -> list[Check]:
    token_set = hub_token() is not None
    token_row = Check("hub token", PASS, "set" if token_set else "not set (only gated or private repos need one)")
    from ..core.hub import offline_vars
    offline = offline_vars()
    if offline:
        return [Check("hub", WARN, f"offline mode ({', '.join(v + '=1' for v in offline)}): not contacted",
                      OFFLINE_FIX), token_row]
    from huggingface_hub import constants, model_info
    start = time.monotonic()
    try:
        info = _with_deadline(lambda: model_info(model_id, timeout=HUB_TIMEOUT_S), HUB_TIMEOUT_S + 1)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        return [Check("hub", WARN, f"{constants.ENDPOINT} unreachable ({type(exc).__name__}: {reason})",
                      f"{OFFLINE_FIX}; set HF_HUB_OFFLINE=1 to skip the network"), token_row]
    rows = [Check("hub", PASS, f"{constants.ENDPOINT} reachable ({time.monotonic() - start:.1f} s), "
                  f"{model_id} found")]
    if getattr(info, "gated", False) and not token_set:
        return rows + [Check("hub token", FAIL, f"not set, and {model_id} is gated",
                             "set HF_TOKEN or run `hf auth login` (older huggingface_hub: `huggingface-cli login`)")]
    return rows + [token_row]


# ---- the whole run ----

def run_checks(requirements_path, cache_dir, output_dir, minimal: bool = False, smoke: bool = False,
               model_id: str | None = None, progress=lambda msg: None) -> list[Check]:
    from ..core.paths import DEFAULT_MODEL
    reqs = read_requirements(requirements_path)  # bad file -> InputError before any output
    bnb_spec = next((spec_text(r.specifier) for r in reqs if r.name.lower() == "bitsandbytes"), "") or ">=0.45"
    rows = check_python() + [check_requirement(r, Path(requirements_path).name) for r in reqs]
    if not minimal:
        progress("checking torch and bitsandbytes")
        torch_fix = f"pip install torch, then {INSTALL_FIX}"
        rows += guarded("device", check_device, torch_fix)
        for bits in (8, 4):
            rows += guarded(f"bitsandbytes {bits}-bit", lambda b=bits: check_bnb_matmul(b, bnb_spec),
                            f"pip install 'bitsandbytes{bnb_spec}', or pass --quantization none")
    rows += guarded("disk", lambda: check_disk(cache_dir, output_dir))
    rows += guarded("RAM", check_ram)
    progress("checking the hub")
    rows += guarded("hub", lambda: check_hub(model_id or DEFAULT_MODEL), OFFLINE_FIX)
    if smoke:
        progress("running the smoke test on the tiny model (~30 s, longer the first time)")
        from .smoke import run_smoke
        rows += guarded("smoke", lambda: run_smoke(progress), INSTALL_FIX)
    for r in rows:
        r.detail, r.fix = redact(r.detail), redact(r.fix)
    return rows
