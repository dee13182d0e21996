"""Plots of the v2 figures: throughput against batch size (Publish; Publish + StreamingPull +
acks) beside the aio-pika baselines of the same runs, and the latency distribution of the bus
beside aio-pika's.

Usage: .venv/bin/python bench/plot_v2.py [--run] [--dir DIR] [--out DIR]

Reads v2_publish.json, v2_stream.json and v2_latency.json from --dir (default
/tmp/eventbus-v2-bench), as the benchmarks write them with --json FILE; with --run, runs the
three benchmarks first, one after another, each writing its file there (several minutes). Writes
v2-throughput.png and v2-latency.png to --out (default docs/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("v2_publish", "v2_stream", "v2_latency")
BUS, BASE = "tab:blue", "tab:gray"


def run_all(directory: Path) -> None:
    """Run each benchmark with --json into directory, one after another."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in BENCHMARKS:
        script = ROOT / "bench" / f"{name}.py"
        command = [sys.executable, str(script), "--json", str(directory / f"{name}.json")]
        subprocess.run(command, check=True)


def load(directory: Path) -> dict[str, Any]:
    return {name: json.loads((directory / f"{name}.json").read_text()) for name in BENCHMARKS}


def throughput_panel(axes: Axes, figures: dict[str, Any], title: str, baseline: str) -> None:
    """Messages/s of the bus against batch size, the baseline and the goal as lines across."""
    batches = [row["batch"] for row in figures["bus"]]
    rates = [row["rate"] for row in figures["bus"]]
    base, goal = figures["baseline"]["rate"], figures["goal"]["ratio"]
    axes.plot(batches, rates, "o-", color=BUS, label="bus")
    for batch, rate in zip(batches, rates, strict=True):
        ratio = f"{rate / base:.2f}x"
        axes.annotate(ratio, (batch, rate), textcoords="offset points", xytext=(0, 7))
    axes.axhline(base, color=BASE, linestyle="--", label=baseline)
    axes.axhline(goal * base, color="tab:red", linestyle=":", label=f"goal: {goal:g}x baseline")
    axes.set_xscale("log")
    axes.set_xticks(batches, [str(b) for b in batches])
    axes.set_ylim(0, max(*rates, goal * base, base) * 1.2)
    axes.set(title=title, xlabel="messages per Publish call", ylabel="messages/s")
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)


def plot_throughput(figures: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    publish, stream = figures["v2_publish"], figures["v2_stream"]
    throughput_panel(left, publish, "Publish", "aio-pika publish, confirms, 64 in flight")
    throughput_panel(
        right, stream, "Publish + StreamingPull + acks", "aio-pika publish + consume, acks"
    )
    fig.suptitle("v2 throughput beside aio-pika straight to RabbitMQ (same runs, 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cdf(axes: Axes, figures: dict[str, Any], label: str, color: str, style: str = "-") -> None:
    points = figures["quantiles_ms"]
    fractions = [i / (len(points) - 1) for i in range(len(points))]
    label = f"{label}: p50 {figures['p50']:.1f} ms, p99 {figures['p99']:.1f} ms"
    axes.plot(points, fractions, style, color=color, label=label)


def plot_latency(figures: dict[str, Any], path: Path) -> None:
    latency = figures["v2_latency"]
    fig, axes = plt.subplots(figsize=(8, 4.5))
    cdf(axes, latency["baseline"], "aio-pika publish -> consumer", BASE, "--")
    colors = iter(["tab:blue", "tab:green", "tab:orange"])
    for row in latency["bus"]:
        cdf(axes, row, f"bus, {row['batch']} per Publish -> StreamingPull", next(colors))
    axes.axhline(0.99, color="black", linewidth=0.5, linestyle=":")
    axes.set_xscale("log")
    axes.set(
        title=f"Latency publish -> receipt at {latency['rate']:,.0f} msgs/s (CDF)",
        xlabel="milliseconds (log scale)",
        ylabel="fraction of messages received",
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="store_true", help="run the benchmarks first")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/eventbus-v2-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.run:
        run_all(args.dir)
    figures = load(args.dir)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_throughput(figures, args.out / "v2-throughput.png")
    plot_latency(figures, args.out / "v2-latency.png")
    print(f"wrote {args.out / 'v2-throughput.png'} and {args.out / 'v2-latency.png'}")


if __name__ == "__main__":
    main()
