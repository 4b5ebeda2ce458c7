"""A throwaway Orthanc PACS on 127.0.0.1 for the tests, the benchmark and `make demo-pacs`.

Debian packages `orthanc` + `orthanc-dicomweb` (Orthanc 1.10 and its DICOMweb plugin 1.7 on Debian 12).
Each instance gets its own folder (storage, index, config, log), free ports, HTTP authentication on,
HTTP reachable from localhost only, and no DICOM (DIMSE) server unless asked for; when it is asked
for, it accepts no unknown modality (no echo, no store, called AET checked). As root the server runs as
`nobody`. It is stopped by its pid (SIGTERM, then SIGKILL), never by name.

Two users: `user` may do anything; `viewer` may only read (a Lua filter answers 403 to anything but
GET for it), which is how the tests reach a real 403.

    with orthanc_server(workdir) as pacs:   # pacs.dicomweb_url, pacs.user, pacs.password, pacs.pid
        ...
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL_HINT = ("Orthanc is not installed: as root run `apt-get install -y orthanc orthanc-dicomweb` "
                "(Debian/Ubuntu), then stop the system service it starts (`service orthanc stop`)")

# Orthanc calls this for every HTTP request; `viewer` gets 403 for anything but a read.
_LUA_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if username == 'viewer' then
    return method == 'GET'
  end
  return true
end
"""


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int | None
    user: str
    password: str
    viewer_password: str
    workdir: Path
    pid: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def logfile(self) -> Path:
        return self.workdir / "orthanc.log"


def find_orthanc() -> str | None:
    """The Orthanc binary when both it and the DICOMweb plugin are installed, else None."""
    binary = shutil.which(ORTHANC_BINARY) or (
        "/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    return binary if binary and os.path.exists(DICOMWEB_PLUGIN) else None


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(workdir: Path, http_port: int, dicom_port: int | None, users: dict) -> dict:
    return {
        "Name": "pmcvqa-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,          # HTTP from 127.0.0.1 only
        "AuthenticationEnabled": True,
        "RegisteredUsers": users,
        "OrthancExplorerEnabled": False,
        "HttpDescribeErrors": False,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port or free_port(),
        "DicomAet": "PMCVQATEST",
        "DicomCheckCalledAet": True,           # a restricted DICOM port: no unknown modality may talk
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "LuaScripts": [str(workdir / "filter.lua")],
        "StorageCompression": False,
        "SaveJobs": False,
    }


def start_orthanc(workdir=None, *, dicom: bool = False, timeout: float = 30.0) -> OrthancServer:
    """Start Orthanc in `workdir` (a new temp folder if None) and wait until GET /system answers 200."""
    binary = find_orthanc()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
    workdir.mkdir(parents=True, exist_ok=True)
    user, password, viewer_password = "pmcvqa", secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    http_port = free_port()
    dicom_port = free_port() if dicom else None
    (workdir / "filter.lua").write_text(_LUA_FILTER)
    config = workdir / "orthanc.json"
    config.write_text(json.dumps(_config(workdir, http_port, dicom_port,
                                         {user: password, "viewer": viewer_password}), indent=1))
    run_as = {}
    if os.geteuid() == 0:
        # Never run a network server as root: hand the folder to nobody and drop to it.
        nobody = pwd.getpwnam("nobody")
        closed = [p for p in workdir.resolve().parents if not os.stat(p).st_mode & 0o001]
        if closed:  # e.g. pytest's tmp_path lives under a 0700 folder of root's
            raise RuntimeError(f"Orthanc runs as nobody, who cannot enter {closed[0]}: "
                               f"give a work folder under /tmp (or None for a new one)")
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.chmod(config, 0o600)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    log = workdir / "orthanc.log"
    proc = subprocess.Popen([binary, f"--logfile={log}", str(config)], cwd=workdir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, **run_as)
    server = OrthancServer(http_port, dicom_port, user, password, viewer_password, workdir,
                           proc.pid, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {proc.returncode} at start; see {log}")
        try:
            r = requests.get(f"{server.url}/system", auth=(user, password), timeout=2)
            if r.status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    stop_orthanc(server)
    raise RuntimeError(f"Orthanc did not answer on port {http_port} within {timeout:.0f} s; see {log}")


def stop_orthanc(server: OrthancServer, timeout: float = 20.0) -> None:
    """SIGTERM the server's pid, wait, SIGKILL if it lingers."""
    proc = server.process
    if proc.poll() is not None:
        return
    os.kill(server.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def orthanc_server(workdir=None, **kwargs):
    """`with orthanc_server() as pacs:` start, yield, always stop (and remove a temp folder we made)."""
    made = workdir is None
    server = start_orthanc(workdir, **kwargs)
    try:
        yield server
    finally:
        stop_orthanc(server)
        if made:
            shutil.rmtree(server.workdir, ignore_errors=True)
