"""`make demo-pacs`: the PACS loop offline on the tiny image model (docs/PACS.md).

    python -m pmcvqa_sft.verify.pacs_demo --adapter RUN/model --out RUN

Starts a throwaway Orthanc (verify/orthanc.py), uploads the bundled figures (data/sample_vision/demo/*)
as DICOM Secondary Captures of one synthetic study, runs `inference_example.py --pacs ... --pacs_out
--write_sr` as a user would (credentials in the environment only), reads the SRs back from the PACS and
prints their text, then stops Orthanc. The tiny model's answers are not the point: the loop is.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..core.paths import ROOT
from ..data import dicom_samples, pacs
from ..infer.pacs import print_srs
from . import orthanc

FIGURES = ROOT / "data" / "sample_vision" / "demo"
QUESTION = "What colour is the square in the figure?"
CHOICES = ["Red", "Green", "Blue", "Yellow"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a tiny-vision training output folder")
    ap.add_argument("--out", required=True, help="folder for answers.jsonl and the SR files")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not orthanc.find_orthanc():
        print(f"demo-pacs needs Orthanc: {orthanc.INSTALL_HINT}")
        return 1
    start = time.time()
    with orthanc.orthanc_server() as server:
        print(f"==> Orthanc {server.url} (pid {server.pid}, auth on, DICOM port off) ready in "
              f"{time.time() - start:.1f} s")
        env = {**os.environ, pacs.ENV_USER: server.user, pacs.ENV_PASSWORD: server.password}
        os.environ.update({pacs.ENV_USER: server.user, pacs.ENV_PASSWORD: server.password})
        client = pacs.connect(server.dicomweb_url)
        study = pacs.generate_uid()
        series = pacs.generate_uid()
        figures = sorted(p for p in FIGURES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for i, path in enumerate(figures, 1):
            client.store(dicom_samples.secondary_capture(path, study_uid=study, series_uid=series,
                                                         instance_number=i, description=path.stem))
        print(f"==> uploaded {len(figures)} figures as Secondary Captures: study {study}")
        cmd = [sys.executable, str(ROOT / "inference_example.py"), "--adapter", args.adapter, "--greedy",
               "--pacs", server.dicomweb_url, "--study", study, "--question", QUESTION,
               "--choices", *CHOICES, "--pacs_out", str(out / "answers.jsonl"), "--write_sr",
               "--sr_out", str(out / "sr")]
        print("==> " + " ".join(cmd[1:]))
        rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=1800).returncode
        if rc:
            print(f"inference_example.py exited with {rc}")
        print("==> the SRs read back from the PACS:")
        n = print_srs(client, study)
    print(f"==> Orthanc stopped; {n} SR(s) read back; answers in {out / 'answers.jsonl'}")
    return 0 if n == len(figures) and not rc else 1


if __name__ == "__main__":
    raise SystemExit(main())
