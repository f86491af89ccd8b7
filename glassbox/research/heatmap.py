"""Attention matrix -> PNG heatmap with token labels (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io


def attention_png(matrix: list[list[float]], tokens: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    n = len(tokens)
    size = min(4 + 0.25 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    try:
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
        labels = [repr(t)[1:-1] for t in tokens]  # show spaces and newlines
        if n <= 128:
            ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)
