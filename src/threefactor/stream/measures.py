"""The standard measures of continual learning, from a stream's windows and probes.

- ``average_accuracy``: the prequential accuracy over the whole stream (every judged step
  counts once), the online counterpart of the average accuracy of continual learning.
- ``forgetting``: for each earlier group of classes, the best accuracy a probe ever measured on
  it minus its accuracy at the end, averaged over the groups (Chaudhry et al. 2018).
- ``recovery_time``: after a domain shift, the stream time until the windowed accuracy is back
  within ``tolerance`` of its level just before the shift.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def average_accuracy(rows: Sequence[dict], layer: int = -1) -> float | None:
    """Judged-step-weighted mean of the windows' accuracy of ``layer`` (None: nothing judged)."""
    total = judged = 0.0
    for r in rows:
        if r.get("accuracy") is None:
            continue
        n = r["steps"] * r["judged_fraction"]
        total += r["accuracy"][layer] * n
        judged += n
    return total / judged if judged else None


def forgetting(probes: Sequence[Mapping[str, float]]) -> float | None:
    """``probes``: one mapping per evaluation, in stream order, from a group of classes to its
    accuracy then. The mean, over every group but the last one to appear, of its best earlier
    accuracy minus its final accuracy (None: fewer than two groups)."""
    if not probes:
        return None
    final = probes[-1]
    order = list(dict.fromkeys(g for p in probes for g in p))  # groups by first appearance
    groups = [g for g in order[:-1] if g in final and any(g in p for p in probes[:-1])]
    drops = [max(p[g] for p in probes[:-1] if g in p) - final[g] for g in groups]
    return sum(drops) / len(drops) if drops else None


def recovery_time(rows: Sequence[dict], shift_s: float, tolerance: float = 0.05,
                  before_windows: int = 5, layer: int = -1) -> float | None:
    """Seconds of stream time from ``shift_s`` until a window's accuracy is at least the mean of
    the ``before_windows`` windows that ended before the shift minus ``tolerance``; 0 when the
    first window after the shift already is, None when it never recovers."""
    judged = [r for r in rows if r.get("accuracy") is not None]
    before = [r["accuracy"][layer] for r in judged if r["time_s"] <= shift_s][-before_windows:]
    if not before:
        return None
    level = sum(before) / len(before) - tolerance
    for r in judged:
        if r["time_s"] > shift_s and r["accuracy"][layer] >= level:
            previous_end = max([q["time_s"] for q in judged if q["time_s"] < r["time_s"]], default=shift_s)
            return max(0.0, previous_end - shift_s)
    return None
