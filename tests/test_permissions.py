"""Outputs get ordinary permissions (0755 folders, 0644 files under the usual umask 022), not the private
0700 that tempfile.mkdtemp gives the temp folders they are written in; a stricter umask is respected."""
from __future__ import annotations

import os
import stat


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_atomic_dir_follows_the_umask(tmp_path):
    from pmcvqa_sft.core.atomic import atomic_dir
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "a") as tmp:
            (tmp / "f.txt").write_text("x")
        assert _mode(tmp_path / "a") == 0o755 and _mode(tmp_path / "a" / "f.txt") == 0o644
        os.umask(0o027)
        with atomic_dir(tmp_path / "b") as tmp:
            (tmp / "f.txt").write_text("x")
        assert _mode(tmp_path / "b") == 0o750 and _mode(tmp_path / "b" / "f.txt") == 0o640
    finally:
        os.umask(old)


def test_preprocess_output_is_not_private(processed_tiny):
    want_dir, want_file = 0o777 & ~_umask(), 0o666 & ~_umask()
    assert _mode(processed_tiny) == want_dir
    for p in processed_tiny.rglob("*"):
        assert _mode(p) == (want_dir if p.is_dir() else want_file), p
