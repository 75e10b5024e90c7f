"""`sdar inspect-gates --png`: the gates of a run as one PNG of three plots (matplotlib, no display).

    left    gate distribution per step: the share of tokens in each gate bin, per step shown
    middle  active ratio (gate > 0.5) and mean teacher-student gap over training steps (metrics.jsonl)
    right   mean gate and active ratio by turn index, in the selected step
"""

from __future__ import annotations

from pathlib import Path

from . import ACTIVE_GATE, GATE_RAMP, GateView, gate_histogram, training_curve, turn_stats


def write_png(path: Path, view: GateView) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.ticker import MaxNLocator

    ramp = LinearSegmentedColormap.from_list("gate", [(stop, [c / 255 for c in rgb]) for stop, rgb in GATE_RAMP])
    figure, (dist_axis, curve_axis, turn_axis) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    figure.suptitle(f"Gates of {view.source}" + (" (fresh rollouts)" if view.fresh else ""), fontsize=11)

    steps = list(view.steps)
    shares = []
    for records in view.steps.values():
        counts = gate_histogram([g for record in records for g in record.gate])
        total = sum(counts) or 1
        shares.append([count / total for count in counts])
    columns = [list(column) for column in zip(*shares)]  # bins x steps
    image = dist_axis.imshow(columns, origin="lower", aspect="auto", cmap="Greys", vmin=0, extent=(-0.5, len(steps) - 0.5, 0, 1))
    dist_axis.set_xticks(range(len(steps)), [str(step) for step in steps], fontsize=8)
    dist_axis.set_xlabel("step")
    dist_axis.set_ylabel("gate")
    dist_axis.set_title("gate distribution per step (share of tokens)", fontsize=10)
    figure.colorbar(image, ax=dist_axis, fraction=0.046)

    curve = training_curve(view)
    curve_steps = [row["step"] for row in curve]
    curve_axis.plot(curve_steps, [row["active_ratio"] for row in curve], marker="o", color="#16a34a", label=f"active ratio (gate > {ACTIVE_GATE})")
    curve_axis.set_xlabel("step")
    curve_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve_axis.set_ylabel("active ratio", color="#16a34a")
    curve_axis.set_ylim(0, 1)
    gap_axis = curve_axis.twinx()
    gap_axis.plot(curve_steps, [row["gap_mean"] for row in curve], marker="s", color="#dc2626", label="mean gap T - S")
    gap_axis.set_ylabel("mean gap T - S", color="#dc2626")
    curve_axis.set_title("over training steps", fontsize=10)
    lines = curve_axis.get_lines() + gap_axis.get_lines()
    curve_axis.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower left")

    stats = turn_stats(view.records)
    turns = [stat.turn for stat in stats]
    turn_axis.bar(turns, [stat.gate_mean for stat in stats], color=[ramp(stat.gate_mean) for stat in stats], edgecolor="#555", label="mean gate")
    turn_axis.plot(turns, [stat.active_ratio for stat in stats], marker="o", color="#1d2330", label="active ratio")
    turn_axis.axhline(ACTIVE_GATE, color="#999", linewidth=0.8, linestyle="--")
    turn_axis.set_ylim(0, 1)
    turn_axis.set_xticks(turns)
    turn_axis.set_xlabel("turn index")
    turn_axis.set_title(f"gate by turn (step {view.step})", fontsize=10)
    turn_axis.legend(fontsize=8, loc="lower left")

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
