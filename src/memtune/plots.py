"""The comparison's pictures: peak memory against accuracy and against step time, labels that never overlap.

    plot_memory_vs_accuracy(records, "memory_vs_accuracy.png")
    plot_memory_vs_time(records, "memory_vs_time.png")      # accuracy as colour, the Pareto front drawn

Labels are placed greedily (`place_labels`): each label goes to the nearest free slot around its point,
trying offsets on rings of growing radius, so two methods at the same spot get two readable labels.
"""
from __future__ import annotations

import math

GIB = 2 ** 30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(records):
    return [r for r in records if "error" not in r and r.get("peak_bytes") is not None]


def _score(r):
    """Accuracy in % (classification) or None (a causal LM reports perplexity)."""
    return None if r.get("accuracy") is None else 100 * r["accuracy"]


def place_labels(ax, points, labels, fontsize=8, ring_px=11.0, rings=12):
    """Annotate each (x, y) in data coordinates with its label at the nearest slot whose box overlaps no
    label placed before it and no marker. Returns the annotations' boxes (display pixels), in order."""
    fig = ax.figure
    fig.canvas.draw()                                   # fixes the axes' transform before measuring
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    markers = [to_px(p) for p in points]
    placed, texts = [], []
    # Offsets (points) on rings around the marker: right, upper right, up, ... then the next ring out.
    slots = [(0.0, 0.0)]
    for k in range(1, rings + 1):
        n = 8 * k
        slots += [(k * ring_px * math.cos(2 * math.pi * j / n), k * ring_px * math.sin(2 * math.pi * j / n))
                  for j in range(n)]
    for (x, y), label in zip(points, labels):
        best = None
        for dx, dy in slots[1:]:
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                            ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top")
            box = t.get_window_extent(renderer).expanded(1.05, 1.15)
            clear = not any(box.overlaps(b) for b in placed) and not any(
                box.x0 - 3 <= mx <= box.x1 + 3 and box.y0 - 3 <= my <= box.y1 + 3 for mx, my in markers)
            if clear:
                best = (t, box)
                break
            t.remove()
        if best is None:                               # every slot taken: the farthest one, still readable
            dx, dy = slots[-1]
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize)
            best = (t, t.get_window_extent(renderer))
        t, box = best
        if math.hypot(*t.xyann) > 1.5 * ring_px:       # far from its point: redraw with a thin line back
            xytext, ha, va = t.xyann, t.get_ha(), t.get_va()
            t.remove()
            t = ax.annotate(label, (x, y), textcoords="offset points", xytext=xytext, fontsize=fontsize, ha=ha,
                            va=va, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0})
        placed.append(box)
        texts.append(t)
    return placed


def pareto_front(points):
    """Indices of the points no other point beats on both axes (both smaller is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _title(ax, records):
    from .compare import memory_shape

    s = records[0]["settings"]
    ax.set_title(f"{s['model']} on {s['task']}; memory of one step at {memory_shape(s)}, {s['precision']}",
                 fontsize=9)


def plot_memory_vs_accuracy(records, path) -> None:
    plt = _pyplot()
    ok = [r for r in _ok(records) if _score(r) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [(r["peak_bytes"] / GIB, _score(r)) for r in ok]
    for x, y in pts:
        ax.scatter(x, y, s=40)
    ax.set_xlabel("peak training memory (GiB)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ok:
        _title(ax, ok)
        ax.margins(0.15)
        fig.tight_layout()
        place_labels(ax, pts, [r["label"] for r in ok])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_memory_vs_time(records, path) -> None:
    """Peak memory against step time; colour = accuracy; the Pareto front (less memory and less time)."""
    plt = _pyplot()
    ok = [r for r in _ok(records) if r.get("step_time_s")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [(r["step_time_s"], r["peak_bytes"] / GIB) for r in ok]
    scores = [_score(r) for r in ok]
    if ok:
        have = [s for s in scores if s is not None]
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=45, zorder=3,
                        c=[s if s is not None else math.nan for s in scores] if have else "tab:blue",
                        cmap="viridis", edgecolors="k", linewidths=0.4)
        if have:
            fig.colorbar(sc, ax=ax, label="test accuracy (%)")
        front = pareto_front(pts)
        if len(front) > 1:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red", lw=1,
                    zorder=2, label="Pareto front (less memory and less time)")
            ax.legend(fontsize=8, loc="upper right")
        _title(ax, ok)
    ax.set_xlabel("step time (s)")
    ax.set_ylabel("peak training memory (GiB)")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    if ok:
        place_labels(ax, pts, [r["label"] for r in ok])
    fig.savefig(path)
    plt.close(fig)
