"""The torch thread count is chosen in one place (pmcvqa_sft/threads.py): 1 for the tiny model, an
explicit --threads / PMCVQA_THREADS wins, bad values are one-line errors."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def restore_threads(monkeypatch):
    from pmcvqa_sft.core import threads
    n = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "_explicit", None)
    yield threads
    torch.set_num_threads(n)


def test_tiny_model_gets_one_thread(restore_threads, tiny_dir):
    from pmcvqa_sft.models.loading import load_model
    th = restore_threads
    assert th.choose_threads("tiny") == 1 and th.choose_threads(str(tiny_dir)) == 1
    torch.set_num_threads(2)
    load_model("tiny", "none")  # every script loads through here
    assert torch.get_num_threads() == 1


def test_explicit_choice_wins_and_is_remembered(restore_threads, monkeypatch):
    th = restore_threads
    monkeypatch.setenv(th.ENV, "3")
    assert th.choose_threads("tiny") == 3  # the environment overrides the rule
    monkeypatch.delenv(th.ENV)
    assert th.configure_threads(threads=2) == 2
    assert th.configure_threads("tiny") == 2  # a later automatic choice keeps --threads


@pytest.mark.parametrize("env,threads", [("two", None), (None, 0)])
def test_bad_thread_counts_are_one_line_errors(restore_threads, monkeypatch, env, threads):
    from pmcvqa_sft.core.errors import InputError
    th = restore_threads
    if env:
        monkeypatch.setenv(th.ENV, env)
    with pytest.raises(InputError) as err:
        th.choose_threads("tiny", threads)
    assert th.ENV in str(err.value) and "\n" not in str(err.value)
