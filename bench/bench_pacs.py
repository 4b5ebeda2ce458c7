"""Fetch + window throughput from a local Orthanc: 512x512 CT instances per second.

Starts a throwaway Orthanc (orthanc_fixture), stores N synthetic CT slices (one series, uncompressed,
and the same again as JPEG 2000 lossless), then times search + WADO-RS retrieve + windowing to the RGB
image the model gets, one instance after the other (what `--pacs` batch mode does). Prints and writes
JSON. Usage: python bench/bench_pacs.py [--n 30] [--out bench/results/pacs.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402
from pmcvqa_sft.data import dicom, pacs  # noqa: E402
from pmcvqa_sft.data import dicom_samples as synth  # noqa: E402
from pmcvqa_sft.verify import orthanc as orthanc_fixture  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402


def run(client, study: str, series: str) -> dict:
    start = time.perf_counter()
    refs = client.search(study=study, series=series)
    searched = time.perf_counter()
    fetch = window = 0.0
    for ref in refs:
        t0 = time.perf_counter()
        ds = client.retrieve(ref)
        t1 = time.perf_counter()
        dicom.dataset_to_image(ds, what=f"instance {ref.sop}")
        fetch, window = fetch + t1 - t0, window + time.perf_counter() - t1
    total = time.perf_counter() - start
    return {"instances": len(refs), "search_s": round(searched - start, 4), "fetch_s": round(fetch, 3),
            "window_s": round(window, 3), "total_s": round(total, 3),
            "instances_per_s": round(len(refs) / total, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pacs.json"))
    args = ap.parse_args()
    results = {"n": args.n, "rows": 512, "columns": 512, "machine": platform.machine(),
               "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with orthanc_fixture.orthanc_server() as server:
        os.environ[pacs.ENV_USER], os.environ[pacs.ENV_PASSWORD] = server.user, server.password
        client = pacs.connect(server.dicomweb_url)
        study = generate_uid()
        for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless):
            series = generate_uid()
            t0 = time.perf_counter()
            for i in range(args.n):
                ds = synth.ct_slice(study_uid=study, series_uid=series, instance_number=i + 1)
                client.store(ds if syntax == ExplicitVRLittleEndian else synth.compress(ds, syntax))
            stored = time.perf_counter() - t0
            run(client, study, series)  # warm-up: connection, decoder plugins
            results[syntax.name] = {"store_s": round(stored, 2), **run(client, study, series)}
    write_results(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
