"""PNG chart: TPS and p99 latency per client count for each target, one column per mode."""

from __future__ import annotations

from bench.records import TARGETS, Summary

# the same in every subplot
COLORS = {"direct": "C0", "pgbouncer": "C1", "pgdoorman": "C2", "pgdoorman-1w": "C3", "pgdoorman-base": "C4",
          "pgdoorman-base-1w": "C5"}


def write_png(path: str, summaries: list[Summary], modes: list[str], tls: bool = False) -> bool:
    """Write the chart; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [s for s in summaries if s.case == "select" and not s.skipped and s.tps > 0]
    modes = [m for m in modes if any(s.mode == m for s in rows)] or modes
    fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        tps_ax, p99_ax = axes[0][col], axes[1][col]
        for target in TARGETS:
            points = sorted((s.clients, s.tps, s.p99_ms) for s in rows
                            if s.mode == mode and s.target == target)
            if not points:
                continue
            xs = [p[0] for p in points]
            style = {"marker": "o", "label": target, "color": COLORS.get(target)}
            tps_ax.plot(xs, [p[1] for p in points], **style)
            p99_ax.plot(xs, [p[2] for p in points], **style)
        clients = sorted({s.clients for s in rows if s.mode == mode})
        for ax in (tps_ax, p99_ax):
            ax.set_xscale("log")
            if clients:
                ax.set_xticks(clients, [str(c) for c in clients])
                ax.minorticks_off()
            ax.set_xlabel("clients")
            ax.grid(True, alpha=0.3)
            ax.legend()
        missing = sorted({s.target for s in summaries if s.mode == mode and s.skipped})
        tps_ax.set_title(f"pgbench -S -M {mode}" + (", client TLS" if tls else "")
                         + (f" ({', '.join(missing)}: n/a)" if missing else ""))
        tps_ax.set_ylabel("TPS (median)")
        tps_ax.set_ylim(bottom=0)
        p99_ax.set_ylabel("p99 latency, ms")
        p99_ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
