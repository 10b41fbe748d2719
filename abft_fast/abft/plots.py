"""PNG plots of an ABFT run: per-layer attention mass on labels, and the training curve."""
from __future__ import annotations


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def attention_mass(before: dict, after: dict | None, path, title=""):
    """Per-layer mean last-row attention on correct vs wrong demonstration labels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    layers = range(len(before["correct"]))
    ax.plot(layers, before["correct"], "-", color="tab:green", alpha=0.5, label="correct, before")
    ax.plot(layers, before["wrong"], "-", color="tab:red", alpha=0.5, label="wrong, before")
    if after is not None:
        ax.plot(layers, after["correct"], "-o", ms=3, color="tab:green", label="correct, after")
        ax.plot(layers, after["wrong"], "-o", ms=3, color="tab:red", label="wrong, after")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass (mean over heads)")
    ax.set_title(title or "last-token attention on demonstration labels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curve(history: list, path, title=""):
    """Loss (total and per passing head), the PID weight A and the passing-head count per step."""
    plt = _plt()
    steps = [h["step"] for h in history]
    keys = [k for k in ("loss", "loss_per_passing_head", "A", "passing_heads") if k in history[0]]
    labels = {"loss": "ABFT loss (sum over passing heads)", "loss_per_passing_head":
              "loss per passing head", "A": "A (wrong-label weight)",
              "passing_heads": "passing heads / sample"}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.7 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        label = labels[key]
        ax.plot(steps, [h[key] for h in history], "-o", ms=3)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
