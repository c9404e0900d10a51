"""The figure of a localization: each bound's sweep (proxy and generation counts) and the alpha search."""

from __future__ import annotations

from pathlib import Path


def plot_sweeps(result, path: str | Path) -> Path:
    """Counts along each bound's sweep (proxy and generation), the baseline, the choice; the alpha search.

    ``result``: a :class:`LocateResult` (or one read back with ``LocateResult.from_json``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["upper", "lower"] + (["alpha"] if result.alpha_search else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, bound in zip(axes, panels):
        if bound == "alpha":
            for method in dict.fromkeys(h["method"] for h in result.alpha_search):
                hs = [h for h in result.alpha_search if h["method"] == method]
                ax.plot([h["alpha"] for h in hs], [h["std"] for h in hs], "o-", label=f"sweep std ({method})")
            ax.axhline(result.std_threshold, color="tab:red", ls="--", label=f"threshold {result.std_threshold:.2f}")
            ax.axvline(result.alpha, color="black", alpha=0.3, label=f"alpha {result.alpha:g}")
            ax.set_xlabel("alpha")
            ax.set_ylabel("sample std of refusal counts")
            ax.set_title("alpha search")
            ax.legend(fontsize=8)
            continue
        rows = sorted((r for s in result.sweeps if s["bound"] == bound for r in s["rows"]),
                      key=lambda r: r["range"][1] if bound == "upper" else r["range"][0])
        pos = 1 if bound == "upper" else 0
        x = [r["range"][pos] for r in rows]
        if any(r["proxy_count"] is not None for r in rows):
            ax.plot(x, [r["proxy_count"] for r in rows], "o--", color="tab:blue", label="first-token proxy")
        conf = [r for r in rows if r["confirmed"]]
        ax.plot([r["range"][pos] for r in conf], [r["count"] for r in conf], "s-" if len(conf) > 1 else "s",
                color="tab:orange", label=f"generation + {result.judge}")
        ax.axhline(result.baseline["count"], color="gray", ls=":", label=f"unscaled ({result.baseline['count']})")
        chosen = [s["chosen"] for s in result.sweeps if s["bound"] == bound]
        if chosen:
            ax.axvline(chosen[0][pos], color="tab:red", alpha=0.3, label=f"chosen {chosen[0][0]}-{chosen[0][1]}")
        fixed = [s["fixed"] for s in result.sweeps if s["bound"] == bound]
        other = "lower" if bound == "upper" else "upper"
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"{bound} bound ({other} fixed at {fixed[0] if fixed else '?'})")
        ax.set_ylabel(f"refusals of {result.n_prompts}")
        rule = "argmax" if result.direction == "up" else "argmin"
        ax.set_title(f"{bound}-bound sweep, alpha {result.alpha:g} ({rule})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.model}: safety layers {result.safety_layers[0]}-{result.safety_layers[1]}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
