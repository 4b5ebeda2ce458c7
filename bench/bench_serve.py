"""Load + soak benchmark of `--serve` (transformers serve behind infer/serve_engine.py), 127.0.0.1 only,
bounded counts.

    python bench/bench_serve.py [--adapter runs/demo] --requests 40 --concurrency 4   # -> bench/results/serve.json

Without --adapter it serves the cached quick adapter on the tiny model (`train_quick_adapter`, as
bench_eval.py). Phases (every count is bounded by the flags; nothing runs open-ended):
0. overhead: the same merged folder under plain `transformers serve` (no guard) and under --serve, both
   up at once, the baseline load against each in --rounds alternating rounds (medians reported): the
   guard's end-to-end overhead, measured;
1. baseline: --requests greedy chat completions (max_tokens 16) at --concurrency -> req/s, p50/p95 latency;
2. abandoned streams: --abandon streams opened, first chunk read, connection dropped; then one normal request
   (the server must still answer, and its latency is recorded);
3. huge requests beside normal ones: while --concurrency clients run the baseline again, one 20 MB body
   (over --max_request_bytes: 413) and one 1 MB text (over the prompt-token bound: 400) are sent; the
   normal requests' p50/p95 during that phase and the huge requests' own answer times are recorded;
4. memory: RSS of the engine's process tree before phase 1 and after phase 3;
5. the guard's own cost (in-process): check_chat_body + the text-size bound per request, and the figure
   check of one bundled demo figure as a data URL.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402  (paths relative to the repository)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body: bytes, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    try:
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status, time.perf_counter() - t
    except (BrokenPipeError, ConnectionResetError):
        return -1, time.perf_counter() - t
    finally:
        c.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def run_load(port, body, n, conc):
    t = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        res = list(pool.map(lambda _: post(port, body), range(n)))
    wall = time.perf_counter() - t
    lat = [s for code, s in res if code == 200]
    return {"requests": n, "concurrency": conc, "ok": len(lat), "req_per_s": round(n / wall, 2),
            "p50_s": round(pct(lat, 0.5), 3), "p95_s": round(pct(lat, 0.95), 3)}


def tree_rss_mb(pid) -> float:
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2 ** 20, 1)


def engine_pid(port) -> int:
    import psutil
    for c in psutil.net_connections("tcp"):
        if c.status == "LISTEN" and c.laddr.port == port and c.pid:
            return c.pid
    raise SystemExit("cannot find the engine process")


def abandon_streams(port, body, k) -> int:
    dropped = 0
    for _ in range(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status == 200 and r.fp.readline():
            dropped += 1
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    return dropped


def guard_cost(user: str) -> dict:
    from pmcvqa_sft.infer import serve_engine
    body = {"model": "m", "messages": [{"role": "user", "content": user}], "max_tokens": 16, "temperature": 0}
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        serve_engine.check_chat_body(body)
        serve_engine.text_chars(body)
    text_us = (time.perf_counter() - t) / n * 1e6
    fig = sorted((ROOT / "data" / "sample_vision" / "demo").glob("*.png"))[0]
    url = "data:image/png;base64," + base64.b64encode(fig.read_bytes()).decode()
    ibody = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                     {"type": "text", "text": user}]}]}
    t = time.perf_counter()
    for _ in range(200):
        serve_engine.check_chat_body(ibody)
        serve_engine.check_images(ibody)
    return {"text_request_us": round(text_us, 1), "image_request_us": round((time.perf_counter() - t) / 200 * 1e6, 1),
            "figure": f"{fig.name} ({fig.stat().st_size} bytes)"}


def wait_line(proc) -> tuple[str, float]:
    """The model name from `--serve`'s ready line, and the seconds it took."""
    t0 = time.perf_counter()
    for line in proc.stdout:
        if line.startswith("ready: "):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return line.split("model '", 1)[1].split("'", 1)[0], time.perf_counter() - t0
    raise SystemExit("the server did not start")


def stop(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_stock(adapter, cache, env):
    """Plain `transformers serve` on the merged folder --serve made (no serve_engine): (process, port)."""
    from pmcvqa_sft.infer import serving
    prep = serving.prepare_merged(adapter, None, cache, log=lambda *_: None)
    port = free_port()
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", prep.name, "--host", "127.0.0.1",
           "--port", str(port), "--device", "auto", "--dtype", "auto", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=prep.workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    serving.wait_ready(proc, f"http://127.0.0.1:{port}/v1", 600)
    return proc, port


def overhead(ports: dict, body: bytes, a) -> dict:
    """Alternating rounds of the same load against each server; per side the median of the rounds."""
    runs = {k: [] for k in ports}
    for _ in range(a.rounds):
        for side, port in ports.items():
            runs[side].append(run_load(port, body, a.requests, a.concurrency))
    med = lambda side, key: round(statistics.median(r[key] for r in runs[side]), 3)  # noqa: E731
    out = {side: {"rounds": rs, "median_req_per_s": med(side, "req_per_s"), "median_p50_s": med(side, "p50_s"),
                  "median_p95_s": med(side, "p95_s")} for side, rs in runs.items()}
    out["guarded_vs_stock_p50"] = round(out["guarded"]["median_p50_s"] / out["stock"]["median_p50_s"], 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None, help="training output folder (default: the cached quick adapter)")
    ap.add_argument("--requests", type=int, default=40, help="requests per load phase (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=4, help="clients at once (default: %(default)s)")
    ap.add_argument("--abandon", type=int, default=5, help="streams opened and dropped (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating stock/guarded rounds of the overhead phase (default: %(default)s)")
    ap.add_argument("--serve_cache", default=str(ROOT / "bench" / "_work" / "serve-cache"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    a = ap.parse_args()
    for name in ("requests", "concurrency", "abandon", "rounds"):
        if not 0 < getattr(a, name) <= 1000:
            raise SystemExit(f"--{name} must be in 1..1000")
    from pmcvqa_sft import prompts
    if a.adapter is None:
        from pmcvqa_sft.models.tiny import ensure_tiny
        from pmcvqa_sft.train.quick_adapter import train_quick_adapter
        a.adapter = str(train_quick_adapter(ensure_tiny(), 400))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    user = prompts.format_user_prompt("Which organ produces bile?", {"A": "Kidney", "B": "Spleen", "C": "Liver",
                                                                     "D": "Heart"})

    def body_of(name, **kw) -> bytes:
        return json.dumps({"model": name, "messages": [{"role": "user", "content": user}], "max_tokens": 16,
                           "temperature": 0, **kw}).encode()

    port = free_port()
    srv = subprocess.Popen([sys.executable, "inference_example.py", "--adapter", a.adapter, "--serve", "--port",
                            str(port), "--serve_cache", a.serve_cache], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stock = None
    try:
        name, ready_s = wait_line(srv)
        body = body_of(name)
        pid = engine_pid(port)
        stock, stock_port = start_stock(a.adapter, a.serve_cache, env)
        post(port, body), post(stock_port, body)  # warm-up
        rss_before = tree_rss_mb(pid)
        cost = overhead({"stock": stock_port, "guarded": port}, body, a)
        stop(stock)
        base = run_load(port, body, a.requests, a.concurrency)
        dropped = abandon_streams(port, body_of(name, stream=True, max_tokens=256), a.abandon)
        after_code, after_s = post(port, body)
        huge = {}

        def send_huge():
            time.sleep(0.5)
            huge["20MB_body"] = post(port, json.dumps({"model": name, "messages": [
                {"role": "user", "content": "w" * (20 << 20)}]}).encode())
            huge["1MB_text"] = post(port, json.dumps({"model": name, "messages": [
                {"role": "user", "content": "word " * 200_000}]}).encode())

        th = threading.Thread(target=send_huge)
        th.start()
        beside = run_load(port, body, a.requests, a.concurrency)
        th.join()
        rss_after = tree_rss_mb(pid)
    finally:
        stop(srv)
        if stock is not None:
            stop(stock)
    result = {
        "what": "--serve (transformers serve + serve_engine guard), tiny model, greedy, max_tokens 16, 127.0.0.1",
        "adapter": a.adapter,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "ready_s": round(ready_s, 1), "baseline": base,
        "overhead_vs_stock_transformers_serve": cost,
        "abandoned_streams": {"opened_and_dropped": dropped, "next_request_status": after_code,
                              "next_request_s": round(after_s, 3)},
        "huge_beside_normal": {"normal": beside,
                               "huge": {k: {"status": c, "seconds": round(s, 3)} for k, (c, s) in huge.items()}},
        "rss_mb": {"before": rss_before, "after": rss_after},
        "guard_cost": guard_cost(user),
    }
    write_results(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
