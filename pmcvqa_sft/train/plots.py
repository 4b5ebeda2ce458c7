"""The curves of a training run as a PNG: train and eval loss (SFT); for a GRPO run (its log has `reward`)
one panel each for reward (+ reward std), greedy validation accuracy, completion length (+ clipped
ratio) and KL."""
from __future__ import annotations

import os
from pathlib import Path


def loss_series(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as [(step, loss)] from `TrainerState.log_history`."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e[key])) for e in log_history
            if e.get(key) is not None and "step" in e]


GRPO_PANELS = ((("reward", "reward_std"), "reward (mean, std)"),
               (("eval_strict", "eval_parsed", "eval_text_ok"), "validation % (greedy)"),
               (("completions/mean_length",), "completion tokens"),
               (("completions/clipped_ratio",), "clipped ratio"),
               (("kl",), "KL to the start policy"))


def _grpo_figure(log_history, title):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(GRPO_PANELS), 1, figsize=(7, 2.2 * len(GRPO_PANELS)), dpi=100, sharex=True)
    for ax, (keys, label) in zip(axes, GRPO_PANELS):
        for k in keys:
            pts = series(log_history, k)
            if pts:
                ax.plot(*zip(*pts), "o-" if k.startswith("eval_") else "-", label=k, lw=1.2, ms=3)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged (e.g. KL needs --beta > 0)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimizer step")
    return fig


def plot_loss_curve(log_history: list[dict], path, title: str = "training loss") -> Path:
    """Write the curve to `path` atomically (temp file + rename); headless (Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any("reward" in e for e in log_history):
        fig = _grpo_figure(log_history, title)
        return _save(fig, path, plt)
    train, evals = loss_series(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
