"""The comparison's figures: accuracy against decode speed, and the healing curves."""

from __future__ import annotations

from pathlib import Path

def plot_comparison(out: Path, results: dict) -> list[Path]:
    """Accuracy vs decode speed (paper Fig. 2 style) and the healing curves (held-out KL and ppl vs tokens)."""
    from ..report import pyplot

    plt = pyplot()
    paths = []
    pts = [(n, r) for n, r in results.items() if "eval" in r and r.get("bench")]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 4), dpi=150)
        for n, r in pts:
            ax.scatter(r["bench"]["speedup"], 100 * r["average"], s=24)
            ax.annotate(n, (r["bench"]["speedup"], 100 * r["average"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("decode speed vs base (x)")
        ax.set_ylabel("average accuracy (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_speed.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    curves = {n: r["heal"]["curve"] for n, r in results.items() if r.get("heal") and r["heal"].get("curve")}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=150)
        for n, c in curves.items():
            x = [p["tokens"] for p in c]
            axes[0].plot(x, [p["kl"] for p in c], marker="o", label=n)
            axes[1].plot(x, [p["ppl"] for p in c], marker="o", label=n)
        ref = next(iter(curves.values()))[0]["ppl_teacher"]
        axes[1].axhline(ref, color="black", lw=0.7, ls="--", label="base")
        axes[0].set_ylabel("held-out KL(base || student), nats/token")
        axes[1].set_ylabel("held-out perplexity")
        for ax in axes:
            ax.set_xlabel("healing tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "healing_curves.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths
