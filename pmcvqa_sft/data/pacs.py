"""A PACS over DICOMweb: search, retrieve and store instances, and the answer written back as an SR.

    pacs = connect("https://pacs.example.org/dicom-web")      # credentials: see `credentials()`
    refs = pacs.search(study="1.2...", modality="CT", date="20240101-20240131")
    ds = pacs.retrieve(refs[0])                               # size guard first, from the search
    sr = build_answer_sr(ds, question=..., choices=[...], answer="B: ...", model=..., adapter=...)
    pacs.store(sr)            # STOW-RS into the source study (a new series); or write_sr(sr, folder)
    read_answer_sr(pacs.retrieve(pacs.search(instance=sr.SOPInstanceUID)[0]))

Client: dicomweb-client (QIDO-RS, WADO-RS, STOW-RS). Credentials never come from a flag and are
never printed: PMCVQA_PACS_TOKEN (bearer), or PMCVQA_PACS_USER + PMCVQA_PACS_PASSWORD, or the
netrc-style file named by PMCVQA_PACS_NETRC (default ~/.netrc) with an entry for the PACS host.

Privacy: dicomweb-client and urllib3 log request URLs, whose query strings hold search values (a
date, a patient ID); `redact_http_logs()` rewrites their records. Errors name UIDs, never values.
Search filters are UIDs, a modality and a date (range): no name or wildcard search (Orthanc's
DICOMweb plugin does not decode %2A, %5E or %20 in them, see DESIGN.md).
"""
from __future__ import annotations

import copy
import io
import logging
import netrc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import highdicom as hd
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pmcvqa_sft.core.errors import InputError

from .dicom import check_size, quiet_pydicom

ENV_TOKEN, ENV_USER, ENV_PASSWORD, ENV_NETRC = (
    "PMCVQA_PACS_TOKEN", "PMCVQA_PACS_USER", "PMCVQA_PACS_PASSWORD", "PMCVQA_PACS_NETRC")
SR_SERIES_DESCRIPTION = "AI VQA answer - UNVERIFIED - not for diagnostic use"
SR_SERIES_NUMBER = 9901
MANUFACTURER = "pmcvqa_sft"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^\d{8}(-\d{8})?$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
# QIDO fields the size guard and the batch need; SOP/series/study UIDs come back by default.
_FIELDS = ("Modality", "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "StudyDate")


# ---------------------------------------------------------------- logging redaction
class _Redact(logging.Filter):
    """Rewrites a record so no query string or Authorization header reaches any handler."""
    _query = re.compile(r"\?[^\s'\"]*")
    _auth = re.compile(r"('?authorization'?\s*[:=]\s*)('[^']*'|\"[^\"]*\"|\S+)", re.I)

    def filter(self, record):
        msg = record.getMessage()
        record.msg, record.args = self._auth.sub(r"\1<redacted>", self._query.sub("?<query>", msg)), ()
        return True


_REDACTED_LOGGERS = ("dicomweb_client.web", "dicomweb_client.api", "urllib3.connectionpool",
                     "urllib3.connection", "urllib3.util.retry", "requests")


def redact_http_logs() -> None:
    """Attach the redacting filter to the HTTP loggers (idempotent). A logger's filter sees only its
    own records, so each leaf logger that formats a URL is listed."""
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Redact) for f in logger.filters):
            logger.addFilter(_Redact())


# ---------------------------------------------------------------- validation
def check_uid(value: str, flag: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters); the bad value is not echoed."""
    value = str(value).strip()
    if not (len(value) <= 64 and _UID.match(value)):
        raise InputError(f"{flag}: not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def check_date(value: str) -> str:
    """YYYYMMDD or YYYYMMDD-YYYYMMDD (a DICOM date range)."""
    value = str(value).strip()
    if not _DATE.match(value):
        raise InputError("--date: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
    return value


# ---------------------------------------------------------------- connection
def credentials(url: str) -> tuple[str, object]:
    """(source, auth) for `url`: the source is printable ("PMCVQA_PACS_USER", "netrc file
    ~/.netrc", "none"), the auth never is. Order: token, user+password, netrc file."""
    if os.environ.get(ENV_TOKEN):
        return ENV_TOKEN, ("bearer", os.environ[ENV_TOKEN])
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user or password:
        if not (user and password):
            raise InputError(f"set both {ENV_USER} and {ENV_PASSWORD} (one of them is empty)")
        return ENV_USER, (user, password)
    path = Path(os.path.expanduser(os.environ.get(ENV_NETRC) or "~/.netrc"))
    if os.environ.get(ENV_NETRC) and not path.is_file():
        raise InputError(f"{ENV_NETRC} names '{path}': no such file")
    if path.is_file():
        try:
            entry = netrc.netrc(str(path)).authenticators(urlsplit(url).hostname or "")
        except (netrc.NetrcParseError, OSError) as exc:
            # NetrcParseError quotes the offending line, which may be a password: say where only.
            raise InputError(f"netrc file '{path}': cannot parse it (line {getattr(exc, 'lineno', '?')})") \
                from None
        if entry and entry[2] is not None:
            return f"netrc file {path}", (entry[0], entry[2])
    return "none", None


@dataclass(frozen=True)
class InstanceRef:
    """One instance found by a search: its UIDs and what the size guard needs."""
    study: str
    series: str
    sop: str
    sop_class: str = ""
    modality: str = ""
    frames: int = 1
    rows: int = 0
    columns: int = 0
    samples: int = 1

    @classmethod
    def from_json(cls, item: dict) -> "InstanceRef":
        ds = pydicom.Dataset.from_json(item)
        num = (lambda key, default: int(ds.get(key, default) or default))
        return cls(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                   str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")),
                   str(ds.get("Modality", "")), num("NumberOfFrames", 1), num("Rows", 0),
                   num("Columns", 0), num("SamplesPerPixel", 1))


class Pacs:
    """A DICOMweb endpoint with one-line errors; build it with `connect()`."""

    def __init__(self, url: str, client: DICOMwebClient, auth_source: str):
        self.url, self.client, self.auth_source = url, client, auth_source

    def _call(self, action: str, fn, *args, **kwargs):
        """Run one client call; network and HTTP failures become one line naming `action` (UIDs)."""
        try:
            with quiet_pydicom():
                return fn(*args, **kwargs)
        except requests.exceptions.Timeout:
            raise InputError(f"PACS {self.url}: no answer in time ({action})") from None
        except requests.exceptions.ConnectionError:
            raise InputError(f"PACS {self.url}: unreachable (connection failed; {action})") from None
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code == 401:
                how = (f"credentials from {self.auth_source} were refused" if self.auth_source != "none"
                       else f"no credentials: set {ENV_USER} + {ENV_PASSWORD}, {ENV_TOKEN} or a netrc "
                            f"entry ({ENV_NETRC})")
                raise InputError(f"PACS {self.url}: 401 Unauthorized ({action}): {how}") from None
            if code == 403:
                raise InputError(f"PACS {self.url}: 403 Forbidden: this account may not {action}") \
                    from None
            if code == 404:
                raise InputError(f"PACS {self.url}: not found ({action})") from None
            raise InputError(f"PACS {self.url}: HTTP {code} ({action})") from None

    def search(self, *, study: str | None = None, series: str | None = None,
               instance: str | None = None, modality: str | None = None, date: str | None = None,
               limit: int | None = None) -> list[InstanceRef]:
        """Instances matching every given filter (QIDO-RS); an empty result is an InputError."""
        if series and not study:
            raise InputError("--series needs --study (DICOMweb searches series within a study)")
        filters, said = {}, []
        for flag, value in (("--study", study), ("--series", series), ("--instance", instance)):
            if value:
                said.append(f"{flag.lstrip('-')} UID {check_uid(value, flag)}")
        if instance:
            filters["SOPInstanceUID"] = instance
        if modality:
            if not _MODALITY.match(modality):
                raise InputError("--modality: expected a DICOM modality code such as CT, MR, CR")
            filters["Modality"] = modality
            said.append(f"modality {modality}")
        if date:
            filters["StudyDate"] = check_date(date)
            said.append("the given date")  # a date may be identifying: not repeated in messages
        if not said:
            raise InputError("a PACS search needs --study, --instance, --modality or --date")
        found = self._call("search", self.client.search_for_instances, study_instance_uid=study,
                           series_instance_uid=series, fields=list(_FIELDS),
                           search_filters=filters, limit=limit, get_remaining=limit is None)
        refs = [InstanceRef.from_json(item) for item in found]
        if not refs:
            raise InputError(f"PACS {self.url}: no instance matches {', '.join(said)}")
        return refs

    def retrieve(self, ref: InstanceRef) -> pydicom.Dataset:
        """One instance (WADO-RS) in its stored transfer syntax, after the size guard on `ref`."""
        what = f"instance {ref.sop}"
        if ref.rows and ref.columns:
            check_size(ref.frames, ref.rows, ref.columns, ref.samples, what=what)
        # "*": the stored transfer syntax; asking for another makes the PACS transcode (Orthanc
        # needs its GDCM plugin for JPEG 2000), and we decode every syntax ourselves anyway.
        return self._call(f"retrieve {what}", self.client.retrieve_instance, ref.study, ref.series,
                          ref.sop, media_types=(("application/dicom", "*"),))

    def store(self, ds: pydicom.Dataset) -> None:
        """Store one dataset (STOW-RS) into its own study; a refused instance is an InputError."""
        # A dataset built in memory must go through a Part 10 write + read before STOW
        # (dicomweb-client writes it as it is; Orthanc rejects a missing/partial file meta).
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        with quiet_pydicom():
            part10 = pydicom.dcmread(buf)
        what = f"store instance {ds.SOPInstanceUID}"
        result = self._call(what, self.client.store_instances, [part10],
                            study_instance_uid=str(ds.StudyInstanceUID))
        failed = result.get("FailedSOPSequence", []) if result is not None else []
        if failed:
            raise InputError(f"PACS {self.url}: refused to {what} (failure reason "
                             f"{failed[0].get('FailureReason', '?')})")


def connect(url: str, *, timeout: float = 20.0) -> Pacs:
    """A Pacs for the DICOMweb root `url` (e.g. http://127.0.0.1:8042/dicom-web)."""
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("--pacs: expected an http(s) URL of the DICOMweb root")
    if parts.username or parts.password or parts.query:
        raise InputError(f"--pacs: put no credentials or query in the URL; use {ENV_USER} + "
                         f"{ENV_PASSWORD}, {ENV_TOKEN} or a netrc file")
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    source, auth = credentials(shown)
    redact_http_logs()
    session = requests.Session()
    headers = None
    if isinstance(auth, tuple) and auth[0] == "bearer":
        headers = {"Authorization": f"Bearer {auth[1]}"}
    elif auth is not None:
        session.auth = auth
    session.trust_env = False  # no implicit ~/.netrc or proxy variables: the source above is the one
    client = DICOMwebClient(url=shown, session=session, headers=headers, timeout=timeout)
    # Default retries back off 2+4+8+16 s on every failure, a refused connection included.
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return Pacs(shown, client, source)


# ---------------------------------------------------------------- the answer as a Comprehensive SR
_REQUEST, _FINDING, _COMMENT = codes.DCM.Request, codes.DCM.Finding, codes.DCM.Comment


def _choice_lines(choices) -> list[str]:
    if isinstance(choices, dict):
        return [f"{k}: {v}" for k, v in choices.items()]
    return [str(c) for c in choices]


def build_answer_sr(source: pydicom.Dataset, *, question: str, choices, answer: str, model: str,
                    adapter: str | None = None, frame: int | None = None,
                    software_version: str = "") -> pydicom.Dataset:
    """A Comprehensive SR (TID 2000 shape) answering `question` about `source`, for its own study.

    New series (SR_SERIES_DESCRIPTION: not for diagnostic use), VerificationFlag UNVERIFIED,
    PreliminaryFlag PRELIMINARY, the model + adapter as observer device and contributing equipment,
    the question + choices as a Request text, the answer as a Finding text INFERRED FROM the image
    (frame number for multi-frame), and the evidence sequence referencing `source`.
    """
    device = f"{model} + {adapter}" if adapter else model
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[MANUFACTURER, model, adapter or ""]),  # stable per model
            name=device[:64], manufacturer_name=MANUFACTURER, model_name=model[:64]))
    image = hd.sr.ImageContentItem(
        name=codes.DCM.BestIllustrationOfFinding, referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=frame if int(source.get("NumberOfFrames", 1) or 1) > 1 else None,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM)
    finding = hd.sr.TextContentItem(name=_FINDING, value=str(answer),
                                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    finding.ContentSequence = hd.sr.ContentSequence([image])
    request = hd.sr.TextContentItem(
        name=_REQUEST, value="\n".join([f"Question: {question}", "Choices:", *_choice_lines(choices)]),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    comment = hd.sr.TextContentItem(
        name=_COMMENT, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        value=f"Generated by {device} ({MANUFACTURER}). Unverified; not for diagnostic use.")
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(
        [*hd.sr.ObservationContext(observer_device_context=observer), request, finding, comment])
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=device[:64], software_versions=software_version or None,
        contribution_description="Visual question answering by a language model")
    with quiet_pydicom():
        sr = hd.sr.ComprehensiveSR(
            evidence=[_evidence_copy(source)], content=root, series_instance_uid=generate_uid(),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
            series_description=SR_SERIES_DESCRIPTION, contributing_equipment=[equipment])
        for keyword in _PATIENT_STUDY:  # the source's own values, exactly as the PACS holds them
            if keyword in source:
                sr[keyword] = copy.deepcopy(source[keyword])
    return sr


# highdicom's SOPClass reads these from the evidence with attribute access and converts them:
# an absent type-2 attribute raises AttributeError, an invalid date/time/sex a ValueError that
# quotes the value, and a patient name without '^' is logged (WARNING) with the name.
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _evidence_copy(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source with those attributes blanked (a new mapping: the source is not modified); the SR
    gets the real values back afterwards."""
    evidence = pydicom.Dataset()  # Dataset(source) would share the mapping, update() does not
    evidence.update(source)
    if hasattr(source, "file_meta"):
        evidence.file_meta = source.file_meta
    for keyword in _PATIENT_STUDY:
        if keyword in evidence:  # setting an existing attribute edits the shared element in place
            del evidence[keyword]
        setattr(evidence, keyword, "")
    return evidence


def write_sr(sr: pydicom.Dataset, out_dir) -> Path:
    """`--sr_out DIR`: the SR as DIR/<SOP Instance UID>.dcm (written whole, then renamed)."""
    out = Path(os.path.expanduser(str(out_dir)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{sr.SOPInstanceUID}.dcm"
        tmp = path.with_suffix(".dcm.partial")
        sr.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"--sr_out '{out}': cannot write the SR ({exc.strerror or exc})") from None
    return path


def sr_texts(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """Every TEXT item of an SR as (concept name meaning, text), depth first."""
    found = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "TEXT":
                found.append((str(item.ConceptNameCodeSequence[0].CodeMeaning), str(item.TextValue)))
            walk(item.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return found


def read_answer_sr(ds: pydicom.Dataset) -> dict:
    """An SR written by build_answer_sr -> {question, choices, answer, comment, device, flags}."""
    texts = dict(sr_texts(ds))
    request = texts.get(_REQUEST.meaning, "").split("\n")
    question = request[0].removeprefix("Question: ") if request else ""
    choices = request[2:] if len(request) > 1 and request[1] == "Choices:" else []
    device = ""
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT" and "Device Observer Name" in str(
                item.ConceptNameCodeSequence[0].CodeMeaning):
            device = str(item.TextValue)
    return {"question": question, "choices": choices, "answer": texts.get(_FINDING.meaning, ""),
            "comment": texts.get(_COMMENT.meaning, ""), "device": device,
            "verification": str(ds.get("VerificationFlag", "")),
            "preliminary": str(ds.get("PreliminaryFlag", "")),
            "series_description": str(ds.get("SeriesDescription", ""))}
