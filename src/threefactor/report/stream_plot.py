"""The running accuracy of a stream against stream time, redrawn as the stream goes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..stream.learner import StreamObserver, read_rows
from .plots import new_figure, save_figure

LAYER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def plot_stream(rows: Sequence[dict], path: str | Path, title: str = "", marks: Sequence[tuple[float, str]] = ()) -> Path:
    """Per-layer prequential accuracy of each window, and steps/s, against stream time (s);
    ``marks``: (stream time, text) drawn as vertical lines (phases, shifts)."""
    fig = new_figure(8, 4.5)
    ax, speed = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    judged = [r for r in rows if r.get("accuracy") is not None]
    n_layers = len(judged[0]["accuracy"]) if judged else 0
    for i in range(n_layers):
        ax.plot([r["time_s"] for r in judged], [100 * r["accuracy"][i] for r in judged],
                color=LAYER_COLOURS[i % len(LAYER_COLOURS)], lw=1.2 if i == n_layers - 1 else 0.8,
                label=f"layer {i + 1}")
    for t, text in marks:
        for a in (ax, speed):
            a.axvline(t, color="grey", ls="--", lw=0.8)
        ax.text(t, 101, text, fontsize=7, ha="left", va="bottom")
    ax.set(ylabel="accuracy per window (%)", ylim=(0, 100), title=title)
    if n_layers:
        ax.legend(fontsize=7, loc="lower right")
    speed.plot([r["time_s"] for r in rows], [r["steps_per_s"] for r in rows], color="k", lw=0.8)
    speed.set(xlabel="stream time (s)", ylabel="steps/s")
    return save_figure(fig, Path(path))


class StreamPlotObserver(StreamObserver):
    """Redraws ``RUN_DIR/plots/stream.png`` every ``every`` windows of a stream (and at its end),
    from its rows (one per window: memory grows with the windows only; a resumed stream starts
    from the rows already written)."""

    def __init__(self, run_dir: str | Path, every: int = 10, title: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "plots" / "stream.png"
        self.every, self.title = every, title
        self.rows: list[dict] | None = None

    def on_window(self, row: dict) -> None:
        if self.rows is None:
            self.rows = [r for r in read_rows(self.run_dir) if r["step"] < row["step"]]
        self.rows.append(row)
        if len(self.rows) % self.every == 0:
            plot_stream(self.rows, self.path, self.title)

    def close(self) -> None:
        if self.rows:
            plot_stream(self.rows, self.path, self.title)
