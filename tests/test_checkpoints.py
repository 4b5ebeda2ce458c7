"""Resume after a kill during a checkpoint save: `auto` takes the newest complete checkpoint, says which
partial one it skipped; an explicitly named partial checkpoint is a one-line error."""
from __future__ import annotations

import json
import shutil

import pytest

from test_train import small_opts


@pytest.fixture(scope="module")
def two_checkpoints(processed_tiny, tiny_dir, tmp_path_factory):
    """A finished 6-step run with checkpoint-3 and checkpoint-6 (the way a kill leaves them)."""
    import torch

    from pmcvqa_sft.train.run import run_training
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("ckpt") / "run"
        run_training(small_opts(processed_tiny, out, model=str(tiny_dir), max_steps=6, eval_steps=3,
                                save_total_limit=3, max_samples=48), log=lambda *_: None)
    finally:
        torch.set_num_threads(n)
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    return out


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {
    "no_trainer_state": lambda d: (d / "trainer_state.json").unlink(),
    "truncated_trainer_state": lambda d: _truncate(d / "trainer_state.json"),
    "truncated_adapter": lambda d: _truncate(d / "adapter_model.safetensors"),
    "truncated_optimizer": lambda d: _truncate(d / "optimizer.pt"),
    "no_scheduler": lambda d: (d / "scheduler.pt").unlink(),
    "no_rng_state": lambda d: [f.unlink() for f in d.glob("rng_state*.pth")],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_skips_a_partial_newest_checkpoint(two_checkpoints, tmp_path, damage):
    from pmcvqa_sft.train.checkpoints import checkpoint_problem, newest_complete
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.train.options import TrainOptions
    from pmcvqa_sft.train.run import resolve_resume
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    assert checkpoint_problem(run / "checkpoint-6") is None  # intact before the damage
    DAMAGE[damage](run / "checkpoint-6")
    assert checkpoint_problem(run / "checkpoint-6")
    ckpt, skipped = newest_complete(run)
    assert ckpt == run / "checkpoint-3" and [p for p, _ in skipped] == [run / "checkpoint-6"]
    notes = []
    got = resolve_resume(TrainOptions(dataset_dir="x", output_dir=str(run), resume_from_checkpoint="auto"),
                         log=notes.append)
    assert got == str(run / "checkpoint-3")
    assert len(notes) == 1 and "\n" not in notes[0] and "checkpoint-6" in notes[0] and "checkpoint-3" in notes[0]
    with pytest.raises(InputError) as err:  # named explicitly: refused in one line, with the reason
        resolve_resume(TrainOptions(dataset_dir="x", output_dir=str(run),
                                    resume_from_checkpoint=str(run / "checkpoint-6")))
    assert "not a complete Trainer checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_resume_auto_continues_from_the_older_checkpoint(two_checkpoints, processed_tiny, tiny_dir, tmp_path,
                                                        one_thread):
    from pmcvqa_sft.train.run import run_training
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for name in ("run_card.json", "adapter"):  # as after a kill: the run never finished
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    _truncate(run / "checkpoint-6" / "optimizer.pt")
    notes = []
    card = run_training(small_opts(processed_tiny, run, model=str(tiny_dir), max_steps=6, eval_steps=3,
                                   save_total_limit=3, max_samples=48, resume_from_checkpoint="auto"),
                        log=notes.append)
    assert card["resumed_from"] == str(run / "checkpoint-3")
    assert card["global_step"] == 6
    assert any("skipping partial checkpoint" in n and "checkpoint-6" in n for n in notes), notes
    assert (run / "partial-checkpoint-6").is_dir()  # set aside, not deleted
    assert json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6  # saved anew
    from pmcvqa_sft.train.checkpoints import checkpoint_problem
    assert checkpoint_problem(run / "checkpoint-6") is None


def test_adapter_folder_has_ordinary_permissions(two_checkpoints):
    import os
    import stat
    mask = os.umask(0o022)
    os.umask(mask)
    adapter = two_checkpoints / "adapter"
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o777 & ~mask
    for f in adapter.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
