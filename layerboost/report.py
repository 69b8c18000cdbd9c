"""Figures and the run report (PNG via matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

KIND_COLOURS = {"softmax": "#1f77b4", "swa": "#ff7f0e", "linear_swa": "#9467bd", "none": "#2ca02c"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity(result: dict, plan, path: str | Path) -> Path:
    """Bar chart of each layer's drop (points, 95% interval), coloured by the planned kind (paper Fig. 4)."""
    plt = _plt()
    rows = [r for r in result["layers"] if r["variant"] == "none"]
    x = [r["layer"] for r in rows]
    y = [100 * r["drop"] for r in rows]
    lo = [100 * (r["drop"] - r["drop_ci95"][0]) for r in rows]
    hi = [100 * (r["drop_ci95"][1] - r["drop"]) for r in rows]
    colours = [KIND_COLOURS[plan[i].kind] if plan is not None else "#777777" for i in x]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(x) + 2), 3.6), dpi=150)
    ax.bar(x, y, color=colours, yerr=[lo, hi], capsize=1.5, error_kw={"elinewidth": 0.6, "alpha": 0.6})
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("avg. accuracy drop (points)")
    n = result.get("items_per_task", {})
    ax.set_title(f"Attention removal sensitivity ({', '.join(result['tasks'])}; "
                 f"{min(n.values()) if n else '?'}-{max(n.values()) if n else '?'} items/task)", fontsize=8)
    ax.set_xticks(x)
    ax.tick_params(axis="x", labelsize=6)
    if plan is not None:
        from matplotlib.patches import Patch

        used = [k for k in KIND_COLOURS if any(plan[i].kind == k for i in x)]
        ax.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in used], fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
