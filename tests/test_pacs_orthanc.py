"""Against a real Orthanc: search, retrieve + window, SR write-back and read-back, bad input, and a
whole run with debug logging that must not leak a patient value, a query string or the report text."""
from __future__ import annotations

import io
import logging
import os

import numpy as np
import pydicom
import pytest

from pmcvqa_sft.data import dicom
from pmcvqa_sft.data import dicom_samples as synth
from pmcvqa_sft.data import pacs
from pmcvqa_sft.core.errors import InputError


def ref_of(client, ds):
    (ref,) = client.search(study=ds.StudyInstanceUID, instance=ds.SOPInstanceUID)
    return ref


def test_orthanc_runs_as_configured(orthanc):
    import requests
    assert requests.get(f"{orthanc.url}/system", timeout=5).status_code == 401  # auth on
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{orthanc.pid}").st_uid != 0                      # not as root


def test_search_filters(client, study):
    uid = study["uid"]
    everything = client.search(study=uid)
    assert {r.sop for r in everything} >= {study[k].SOPInstanceUID for k in ("ct", "cr", "pdf", "huge")}
    assert {r.modality for r in client.search(study=uid, modality="CT")} == {"CT"}
    assert len(client.search(study=uid, modality="CT")) == 2  # ct + ct_j2k
    by_date = client.search(date=f"{synth.STUDY_DATE}-{synth.STUDY_DATE}", modality="CR")
    assert study["cr"].SOPInstanceUID in {r.sop for r in by_date}
    series = client.search(study=uid, series=study["multiframe"].SeriesInstanceUID)
    assert [r.sop for r in series] == [study["multiframe"].SOPInstanceUID] and series[0].frames == 5


@pytest.mark.parametrize("key", ["ct", "ct_j2k", "cr", "cr_jpegls", "multiframe"])
def test_retrieved_image_equals_the_local_one(client, study, key):
    ds = client.retrieve(ref_of(client, study[key]))
    assert ds.file_meta.TransferSyntaxUID == study[key].file_meta.TransferSyntaxUID  # not transcoded
    got, info = dicom.dataset_to_image(ds)
    want, _ = dicom.read_dicom(synth.to_bytes(study[key]))
    assert (np.asarray(got) == np.asarray(want)).all() and info["sop_instance_uid"] == ds.SOPInstanceUID


def test_ct_hu_regions_after_fetch(client, study):
    img, info = dicom.dataset_to_image(client.retrieve(ref_of(client, study["ct"])))
    arr = np.asarray(img)[..., 0]
    assert arr[synth.region_box("bone", 512, 512)].min() == 255 and arr[0, 0] == 0
    assert arr[synth.region_box("water", 512, 512)].mean() == 102  # HU 0 in window 40/400
    assert info["window"] == [40.0, 400.0]


def test_sr_write_back_and_read_back(client, study, tmp_path):
    source = client.retrieve(ref_of(client, study["multiframe"]))
    sr = pacs.build_answer_sr(source, question="Which frame is bright?", choices=["A: 1", "B: 3"],
                              answer="B: 3", model="tiny-vision", adapter="runs/demo", frame=3)
    client.store(sr)
    back = client.retrieve(ref_of(client, sr))
    got = pacs.read_answer_sr(back)
    assert got["question"] == "Which frame is bright?" and got["choices"] == ["A: 1", "B: 3"]
    assert got["answer"] == "B: 3" and got["device"] == "tiny-vision + runs/demo"
    assert got["verification"] == "UNVERIFIED" and got["preliminary"] == "PRELIMINARY"
    assert "not for diagnostic use" in got["series_description"]
    assert back.StudyInstanceUID == study["uid"] and back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PatientID == synth.SYNTHETIC_PATIENT["PatientID"]           # same patient
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    image_item = [i for i in back.ContentSequence if i.ValueType == "TEXT"
                  and i.ConceptNameCodeSequence[0].CodeValue == "121071"][0].ContentSequence[0]
    assert image_item.RelationshipType == "INFERRED FROM"
    assert image_item.ReferencedSOPSequence[0].ReferencedFrameNumber == 3
    ours = [e for e in back.ContributingEquipmentSequence if e.Manufacturer == pacs.MANUFACTURER]
    assert ours[0].ManufacturerModelName == "tiny-vision + runs/demo"  # IHE AIR: the model as equipment
    with pytest.raises(InputError, match=r"no pixel data \(Comprehensive SR Storage\)"):
        dicom.dataset_to_image(back)
    path = pacs.write_sr(sr, tmp_path / "out")   # --sr_out: the same object as a file
    assert path.name == f"{sr.SOPInstanceUID}.dcm"
    assert pacs.read_answer_sr(pydicom.dcmread(path)) == pacs.read_answer_sr(sr)


def test_no_pixels_and_size_guard_from_the_pacs(client, study):
    with pytest.raises(InputError, match="no pixel data"):
        dicom.dataset_to_image(client.retrieve(ref_of(client, study["pdf"])))
    ref = ref_of(client, study["huge"])
    assert ref.frames == 40000
    with pytest.raises(InputError, match="40000 frame.*refused before decoding"):
        client.retrieve(ref)   # refused from the search result: nothing is downloaded


def test_uid_matching_nothing(client, study):
    with pytest.raises(InputError, match=r"no instance matches study UID 1\.2\.3\.4\.5"):
        client.search(study="1.2.3.4.5")
    with pytest.raises(InputError, match="not a DICOM UID") as err:
        client.search(study="Synthetic^Privacy^Probe")
    assert "Probe" not in str(err.value)
    with pytest.raises(InputError, match="not found"):
        client.retrieve(pacs.InstanceRef(study["uid"], "1.2.3", "1.2.3.4"))


def test_401_wrong_and_missing_credentials(creds, monkeypatch):
    monkeypatch.setenv(pacs.ENV_PASSWORD, "wrong-password")
    with pytest.raises(InputError, match="401 Unauthorized .*credentials from PMCVQA_PACS_USER were refused") \
            as err:
        pacs.connect(creds.dicomweb_url).search(modality="CT")
    assert "wrong-password" not in str(err.value)
    monkeypatch.delenv(pacs.ENV_USER)
    monkeypatch.delenv(pacs.ENV_PASSWORD)
    with pytest.raises(InputError, match="401 Unauthorized .*no credentials: set PMCVQA_PACS_USER"):
        pacs.connect(creds.dicomweb_url).search(modality="CT")


def test_netrc_and_403_for_a_read_only_account(creds, study, monkeypatch, tmp_path):
    netrc = tmp_path / "pacs.netrc"
    netrc.write_text(f"machine 127.0.0.1 login viewer password {creds.viewer_password}\n")
    netrc.chmod(0o600)
    monkeypatch.delenv(pacs.ENV_USER)
    monkeypatch.delenv(pacs.ENV_PASSWORD)
    monkeypatch.setenv(pacs.ENV_NETRC, str(netrc))
    viewer = pacs.connect(creds.dicomweb_url)
    assert viewer.auth_source == f"netrc file {netrc}"
    assert viewer.search(study=study["uid"], modality="CR")          # reading is allowed
    with pytest.raises(InputError, match="403 Forbidden: this account may not store instance"):
        viewer.store(synth.ct_slice(rows=8, cols=8, study_uid=study["uid"]))


def test_unreachable_and_bad_urls(monkeypatch):
    from pmcvqa_sft.verify.orthanc import free_port
    with pytest.raises(InputError, match="unreachable"):
        pacs.connect(f"http://127.0.0.1:{free_port()}/dicom-web").search(modality="CT")
    with pytest.raises(InputError, match="no credentials or query in the URL") as err:
        pacs.connect("http://user:secret@127.0.0.1:1/dicom-web")
    assert "secret" not in str(err.value)
    with pytest.raises(InputError, match="http"):
        pacs.connect("ftp://127.0.0.1/x")


def test_whole_run_with_debug_logging_leaks_nothing(creds, study, monkeypatch, tmp_path):
    """Every step at DEBUG on the root logger (warnings captured too), then grep the log and the
    error messages for the synthetic patient's values, the search values and the report text."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for name in ("pydicom", "highdicom", "dicomweb_client", "urllib3"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.DEBUG)
    question, answer = "Is the lesion in the xqzlobe?", "C: zqxlesion present"
    errors = []
    try:
        client = pacs.connect(creds.dicomweb_url)
        refs = client.search(date=synth.STUDY_DATE, modality="CT")
        refs += client.search(study=study["uid"], series=study["cr"].SeriesInstanceUID)
        for ref in refs:
            try:
                img, info = dicom.dataset_to_image(client.retrieve(ref), what=f"instance {ref.sop}")
                dicom.describe(info)
            except InputError as exc:
                errors.append(str(exc))
        source = client.retrieve(refs[0])
        sr = pacs.build_answer_sr(source, question=question, choices=["A: no", answer],
                                  answer=answer, model="tiny-vision")
        client.store(sr)
        pacs.read_answer_sr(client.retrieve(ref_of(client, sr)))
        pacs.write_sr(sr, tmp_path / "sr")
        for bad in (lambda: client.search(study="1.2.3.4.5"),
                    lambda: client.retrieve(ref_of(client, study["huge"])),
                    lambda: dicom.dataset_to_image(client.retrieve(ref_of(client, study["pdf"])))):
            with pytest.raises(InputError) as err:
                bad()
            errors.append(str(err.value))
        monkeypatch.setenv(pacs.ENV_PASSWORD, "wrong")
        with pytest.raises(InputError) as err:
            pacs.connect(creds.dicomweb_url).search(date=synth.STUDY_DATE)
        errors.append(str(err.value))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.captureWarnings(False)
    text = buf.getvalue() + "\n".join(errors)
    assert "GET" in buf.getvalue() and len(errors) >= 4          # the run did log and did fail
    secrets = [*(v for k, v in synth.SYNTHETIC_PATIENT.items() if k != "PatientSex"),
               "Synthetic", "Probe", synth.STUDY_DATE, "StudyDate=", "Modality=", question, answer,
               "xqzlobe", "zqxlesion", creds.password]
    leaked = [s for s in secrets if s in text]
    assert not leaked, leaked


def test_cli_batch_with_debug_logging_write_back_and_resume(creds, study, tmp_path):
    """inference_example.py --pacs on the tiny image model with DEBUG logging on: one JSONL line per
    instance (the PDF and the 40,000-frame object as recorded errors, not fatal), SRs stored and read
    back, a rerun asks nothing already answered, and no patient value or password in the output."""
    import json
    import subprocess
    import sys

    from pmcvqa_sft.core.paths import ROOT
    from pmcvqa_sft.infer.pacs import print_srs

    out, srs = tmp_path / "answers.jsonl", tmp_path / "sr"
    question = "What colour is the square in the figure?"
    args = ["--model", "tiny-vision", "--greedy", "--max_new_tokens", "8", "--pacs", creds.dicomweb_url,
            "--study", study["uid"], "--question", question, "--choices", "Red", "Green", "Blue", "Yellow",
            "--pacs_out", str(out), "--write_sr", "--sr_out", str(srs)]
    code = ("import logging, runpy, sys; logging.basicConfig(level=logging.DEBUG); "
            f"sys.argv = ['inference_example.py', *{args!r}]; "
            "runpy.run_path('inference_example.py', run_name='__main__')")

    def cli():
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=900)

    run = cli()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    assert run.returncode == 1, run.stderr[-2000:]                 # some instances failed, the run went on
    assert len(rows) == len(by_uid) == 7
    assert "no pixel data" in by_uid[study["pdf"].SOPInstanceUID]["error"]
    assert "refused before decoding" in by_uid[study["huge"].SOPInstanceUID]["error"]
    answered = [r for r in rows if "answer" in r]
    assert len(answered) == 5 and all(isinstance(r["answer"], str) and "letter" in r for r in answered)
    assert len(list(srs.glob("*.dcm"))) == 5
    client = pacs.connect(creds.dicomweb_url)
    assert print_srs(client, study["uid"], log=lambda *_: None) >= 5   # stored, and read back
    rerun = cli()
    assert "5 already answered" in rerun.stdout and len(out.read_text().splitlines()) == 9
    text = run.stdout + run.stderr + rerun.stdout + rerun.stderr
    assert "DEBUG" in text or "urllib3" in text                     # debug logging was on
    secrets = [*(v for k, v in synth.SYNTHETIC_PATIENT.items() if k != "PatientSex"), "Synthetic",
               "Probe", synth.STUDY_DATE, creds.password]
    leaked = [s for s in secrets if s in text]
    assert not leaked, leaked
