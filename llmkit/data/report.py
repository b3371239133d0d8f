"""The picture of a prepare run: document-length distributions before and after cleaning."""

from __future__ import annotations

from pathlib import Path


def plot_lengths(histogram: dict, path: str | Path) -> None:
    """Write a PNG of the document-length histograms (manifest ``length_histogram``).

    Bars per power-of-two bin of UTF-8 bytes, read (before cleaning) and kept (after), on a
    log-scaled length axis. Uses matplotlib's non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    edges = np.asarray(histogram["bin_edges_bytes"], dtype=float)
    read = np.asarray(histogram["read"])
    kept = np.asarray(histogram["kept"])
    used = np.nonzero(read + kept)[0]
    lo, hi = (used.min(), used.max() + 1) if used.size else (0, 1)
    left = np.maximum(edges[lo:hi], 0.5)
    right = np.append(edges[1:], edges[-1] * 2)[lo:hi]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for counts, label, alpha in ((read[lo:hi], "read", 0.45), (kept[lo:hi], "kept", 0.75)):
        ax.bar(left, counts, width=right - left, align="edge", alpha=alpha, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length (UTF-8 bytes)")
    ax.set_ylabel("documents")
    ax.set_title(
        f"document lengths: {int(read.sum()):,} read, {int(kept.sum()):,} kept after cleaning"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
