"""A full disk during preprocessing or training: one-line error naming the folder and the free space,
the partial output removed, an earlier output intact. The disk is made to fill mid-write by a save that
writes part of its files and then fails the way the real writers do (OSError ENOSPC; safetensors'
'No space left on device (os error 28)')."""
from __future__ import annotations

import errno
import json

import pytest

from conftest import SAMPLE_DIR
from test_train import small_opts


def _enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def test_preprocess_disk_full_keeps_the_earlier_output(tmp_path, tiny_dir, monkeypatch):
    from datasets import load_from_disk

    from pmcvqa_sft.preprocess import run as preprocess
    from pmcvqa_sft.core.errors import InputError
    out = tmp_path / "processed"
    preprocess.run_preprocess(data=str(SAMPLE_DIR), tokenizer_name=str(tiny_dir), output_dir=str(out), progress=False)
    report_before = (out / "preprocess_report.json").read_text()
    real_save = preprocess._save

    def half_written(dsd, path, num_proc, progress):
        real_save(dsd, path, num_proc, progress)  # the shards land in the temp folder, then the disk is full
        (path / "train" / "state.json").write_text("{")
        raise _enospc()

    monkeypatch.setattr(preprocess, "_save", half_written)
    with pytest.raises(InputError) as err:
        preprocess.run_preprocess(data=str(SAMPLE_DIR), tokenizer_name=str(tiny_dir), output_dir=str(out),
                                  overwrite=True, progress=False)
    msg = str(err.value)
    assert "no space left" in msg and str(out) in msg and "MB free" in msg and "MB needed" in msg
    assert "\n" not in msg
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]  # no temp folder left beside it
    assert (out / "preprocess_report.json").read_text() == report_before
    assert len(load_from_disk(str(out))["train"]) > 0


def test_training_disk_full_during_a_checkpoint(processed_tiny, tiny_dir, tmp_path, monkeypatch, one_thread):
    from transformers import Trainer

    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.train.run import run_training

    def save_then_fill(self, model, trial):
        ckpt = tmp_path / "run" / f"checkpoint-{self.state.global_step}"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # cut mid-write
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_fill)
    with pytest.raises(InputError) as err:
        run_training(small_opts(processed_tiny, tmp_path / "run", model=str(tiny_dir), max_steps=3, eval_steps=3,
                                max_samples=24), log=lambda *_: None)
    msg = str(err.value)
    assert "no space left" in msg and str(tmp_path / "run") in msg and "--resume_from_checkpoint auto" in msg
    assert "\n" not in msg
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # the partial checkpoint is gone
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["max_steps"] == 3


def test_other_errors_are_not_called_disk_full(tmp_path):
    from pmcvqa_sft.core.atomic import disk_full_error
    assert disk_full_error(ValueError("bad value"), tmp_path) is None
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full_error(_enospc(), tmp_path) is not None
