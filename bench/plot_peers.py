#!/usr/bin/env python3
"""The plot of ``bench/bench_peers.py``'s JSON: time until the last of N nodes holds the image, per mode.

    .venv/bin/python bench/plot_peers.py bench/results/peers.json bench/results/peers.png

Needs matplotlib (``pip install 'workspace-pilot[bench]'``).
"""

from __future__ import annotations

import json
import sys


def main(source: str, target: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(source, encoding="utf-8") as handle:
        data = json.load(handle)
    rows = data["rows"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, label, style in (("server", "from the service alone", "o-"), ("peers", "with peers", "s-")):
        points = sorted((r["nodes"], r["last_s"]) for r in rows if r["mode"] == mode)
        if points:
            axes.plot([n for n, _ in points], [t for _, t in points], style, label=label)
    ideal = sorted({(r["nodes"], r["ideal_s"]) for r in rows})
    axes.plot([n for n, _ in ideal], [t for _, t in ideal], "k--", label="ideal: size/rate x ceil(log2(N+1))")
    axes.set_xscale("log", base=2)
    axes.set_xticks([n for n, _ in ideal], [str(n) for n, _ in ideal])
    axes.set_xlabel("nodes (N)")
    axes.set_ylabel("seconds until the last node holds the verified image")
    axes.set_title(f"{data['size_mib']} MiB image, every link {data['rate_mbit']} Mbit/s")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
