"""Memory and throughput against the channel count, one line per variant (the paper's Figs. 7-9, 13)."""

from __future__ import annotations

from pathlib import Path


def paper_plots(worst: dict[tuple, dict], folder: str | Path) -> list[Path]:
    """From `paper-cpu`'s worst ranks ((channels, tp, variant, fused, tokenizer) -> record, as
    `bench.paper_sweep.worst_ranks` reduces them): per TP size, whole-step peak memory and samples/s
    against channels; PNGs `folder/memory_tp{T}.png` and `folder/throughput_tp{T}.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for tp in sorted({k[1] for k in worst}):
        for field, label, name in (
            ("peak_mem_bytes", "whole-step peak memory per rank (MiB)", "memory"),
            ("samples_per_s", "samples / s (slowest rank)", "throughput"),
        ):
            fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
            tokenizers = list(dict.fromkeys(k[4] for k in worst))
            for variant in dict.fromkeys(k[2] for k in worst):  # in the sweep's order
                for fused, tokenizer in ((f, t) for f in (False, True) for t in tokenizers):
                    line = (tp, variant, fused, tokenizer)
                    points = sorted((k[0], r[field]) for k, r in worst.items() if k[1:] == line)
                    if not points:
                        continue
                    xs, ys = zip(*points)
                    ys = [y / 2**20 for y in ys] if field == "peak_mem_bytes" else list(ys)
                    named = f" {tokenizer}" if len(tokenizers) > 1 else ""
                    ax.plot(xs, ys, marker="o", linestyle="-" if fused else "--",
                            label=f"{variant}{' fused' if fused else ''}{named}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("channels")
            ax.set_ylabel(label)
            ax.set_title(f"{name} at tp = {tp}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            path = folder / f"{name}_tp{tp}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    return paths
