"""`sdar inspect-gates`: gate records, their statistics, and the agent's tokens coloured by gate.

A gate record is one turn-sample of one training step, as `SDARTrainer._write_gates` writes it to
gates/step-N.jsonl: the response tokens and, per token,
    S_t   student log-prob (the one the loss used)
    T_t   teacher log-prob, the same weights shown the privileged context
    g_t = sigmoid(beta * (T_t - S_t))     the gate: near 1 endorsed, near 0 rejected
plus the turn's action, reward and advantage, and the teacher.placement and teacher.context the teacher
prompt was built with (teacher_placement, teacher_context); the schema is gates.record.GateRecord. Observations
are not stored in the records.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .record import REQUIRED_FIELDS, GateRecord
from ..rundir import GATES_DIR, METRICS_FILE, read_metrics

#: a token is "active" when its gate exceeds this (the metric gate_active_ratio)
ACTIVE_GATE = 0.5
#: the colour ramp of gate values: red (rejected) - pale yellow (0.5) - green (endorsed)
GATE_RAMP = ((0.0, (244, 109, 67)), (0.5, (255, 255, 191)), (1.0, (102, 189, 99)))
#: steps the HTML report and the PNG plots hold at most (evenly spaced over the run)
MAX_REPORT_STEPS = 20


class GateDataError(ValueError):
    """Gate records that are missing, unreadable or match nothing; the message says what to do."""


def parse_record(raw: Any, where: str) -> GateRecord:
    """One JSON object of a gates file as a GateRecord; GateDataError naming `where` if it is not one."""
    if not isinstance(raw, dict):
        raise GateDataError(f"{where}: not a gate record (a JSON object per line is expected).")
    missing = [key for key in REQUIRED_FIELDS if key not in raw]
    if missing:
        raise GateDataError(f"{where}: not a gate record (missing {', '.join(missing)}).")
    try:
        return GateRecord.model_validate(raw)
    except ValidationError as err:
        problem = err.errors()[0]
        if problem["type"] == "value_error":
            raise GateDataError(f"{where}: {problem['ctx']['error']}") from None
        field = ".".join(str(part) for part in problem["loc"])
        raise GateDataError(f"{where}: not a gate record ({field}: {problem['msg']}).") from None


def read_records(path: Path) -> list[GateRecord]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GateDataError(f"Cannot read {path}: {err}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise GateDataError(
                f"{path}, line {number}: not valid JSON ({err.msg}); the file is damaged (was it cut off?)."
            ) from None
        records.append(parse_record(raw, f"{path}, line {number}"))
    if not records:
        raise GateDataError(f"{path} holds no gate records.")
    return records


def is_training_run(path: Path) -> bool:
    """A run directory that `sdar train` wrote to (it has gate records or metrics)."""
    return (path / GATES_DIR).is_dir() or (path / METRICS_FILE).is_file()


def gate_steps(run_dir: Path) -> list[int]:
    """The steps that have a gates/step-N.jsonl file, ascending."""
    steps = []
    for path in (run_dir / GATES_DIR).glob("step-*.jsonl"):
        number = path.stem.removeprefix("step-")
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps)


def gate_file(run_dir: Path, step: int) -> Path:
    return run_dir / GATES_DIR / f"step-{step}.jsonl"


def pick_step(available: Sequence[int], step: int | None, run_dir: Path) -> int:
    """The asked step (default: the latest) after checking it has records."""
    if not available:
        raise GateDataError(
            f"{run_dir} has no gate records ({GATES_DIR}/step-N.jsonl). They are written while training with "
            "algorithm.name sdar, grpo_opsd or opsd and output.save_gates true. To see gates without training, "
            "point inspect-gates at a checkpoint: sdar inspect-gates RUN/checkpoint-N --episodes 4."
        )
    if step is None:
        return available[-1]
    if step not in available:
        raise GateDataError(f"Step {step} has no gate records in {run_dir / GATES_DIR}; steps with records: {_ranges(available)}.")
    return step


def report_steps(available: Sequence[int], selected: int, limit: int = MAX_REPORT_STEPS) -> list[int]:
    """At most `limit` steps evenly spaced over `available`, always with the first, last and selected."""
    if len(available) <= limit:
        return list(available)
    last = len(available) - 1
    picked = {available[round(i * last / (limit - 2))] for i in range(limit - 1)}
    return sorted(picked | {selected})


def select(
    records: Sequence[GateRecord], task: str | None = None, episode: int | None = None, turn: int | None = None
) -> list[GateRecord]:
    """The records of a task (id or type), an episode and a turn; None matches all."""
    return [
        r
        for r in records
        if (task is None or task in (r.task_id, r.task_type))
        and (episode is None or r.episode == episode)
        and (turn is None or r.turn == turn)
    ]


def select_or_explain(
    records: Sequence[GateRecord], step: int, task: str | None, episode: int | None, turn: int | None
) -> list[GateRecord]:
    """`select`, or GateDataError naming what the step's records hold when nothing matches."""
    chosen = select(records, task, episode, turn)
    if not chosen:
        asked = ", ".join(f"{name} {value}" for name, value in (("task", task), ("episode", episode), ("turn", turn)) if value is not None)
        raise GateDataError(
            f"No gate record of step {step} matches {asked}. Step {step} has episodes "
            f"{_ranges(sorted({r.episode for r in records}))}; turns {_ranges(sorted({r.turn for r in records}))}; "
            f"task types {', '.join(sorted({r.task_type for r in records}))}; tasks e.g. {records[0].task_id}."
        )
    return chosen


def _ranges(values: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts: list[str] = []
    start = previous = None
    for value in [*values, None]:
        if start is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ statistics
def gate_histogram(gates: Sequence[float], bins: int = 10) -> list[int]:
    """Counts of gates in [i/bins, (i+1)/bins); the last bin also holds 1.0."""
    counts = [0] * bins
    for gate in gates:
        counts[min(max(int(gate * bins), 0), bins - 1)] += 1
    return counts


@dataclass(frozen=True)
class TokenStat:
    token: str
    count: int
    gate_mean: float
    gap_mean: float


def token_stats(records: Sequence[GateRecord], min_count: int = 2) -> list[TokenStat]:
    """Per distinct token: occurrences, mean gate, mean gap; those seen at least `min_count` times
    (all tokens when none is), ordered from most endorsed (largest mean gap) to most rejected."""
    sums: dict[str, list[float]] = {}
    for record in records:
        for token, gate, gap in zip(record.tokens, record.gate, record.gaps):
            entry = sums.setdefault(token, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += gate
            entry[2] += gap
    stats = [TokenStat(token, int(n), g / n, d / n) for token, (n, g, d) in sums.items()]
    frequent = [s for s in stats if s.count >= min_count] or stats
    return sorted(frequent, key=lambda s: (-s.gap_mean, -s.count, s.token))


@dataclass(frozen=True)
class TurnStat:
    turn: int
    samples: int
    tokens: int
    gate_mean: float
    active_ratio: float


def turn_stats(records: Sequence[GateRecord]) -> list[TurnStat]:
    """Mean gate and active ratio over the tokens of each turn index."""
    by_turn: dict[int, list[GateRecord]] = {}
    for record in records:
        by_turn.setdefault(record.turn, []).append(record)
    stats = []
    for turn in sorted(by_turn):
        gates = [g for record in by_turn[turn] for g in record.gate]
        stats.append(TurnStat(turn, len(by_turn[turn]), len(gates), _mean(gates), _active(gates)))
    return stats


@dataclass(frozen=True)
class GateSummary:
    turn_samples: int
    episodes: int
    tokens: int
    gate_mean: float
    active_ratio: float
    gap_mean: float
    beta: float
    histogram: list[int]
    endorsed: list[TokenStat]
    rejected: list[TokenStat]
    turns: list[TurnStat]


def summarize(records: Sequence[GateRecord], top: int = 8) -> GateSummary:
    """Token-level statistics over the records: the same gate_mean, active ratio (gate > 0.5) and
    teacher_gap_mean that metrics.jsonl logs for a whole step."""
    gates = [g for record in records for g in record.gate]
    gaps = [d for record in records for d in record.gaps]
    ranked = token_stats(records)
    # with fewer than 2 * top distinct tokens, the upper half counts as endorsed and the lower as rejected
    endorsed = ranked[: min(top, (len(ranked) + 1) // 2)]
    rejected = ranked[::-1][: min(top, len(ranked) // 2)]
    return GateSummary(
        turn_samples=len(records),
        episodes=len({r.episode for r in records}),
        tokens=len(gates),
        gate_mean=_mean(gates),
        active_ratio=_active(gates),
        gap_mean=_mean(gaps),
        beta=records[0].beta if records else 0.0,
        histogram=gate_histogram(gates),
        endorsed=endorsed,
        rejected=rejected,
        turns=turn_stats(records),
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _active(gates: Sequence[float]) -> float:
    return sum(g > ACTIVE_GATE for g in gates) / len(gates) if gates else 0.0


# ----------------------------------------------------------------------------------- what is shown
@dataclass
class GateView:
    """What inspect-gates shows: the selected step's (filtered) records, and what the reports plot."""

    source: str
    step: int
    records: list[GateRecord]
    #: step -> its filtered records, for the HTML step selector and the per-step plots
    steps: dict[int, list[GateRecord]]
    #: metrics.jsonl rows of the run ([] when there is none)
    metrics: list[dict[str, Any]]
    fresh: bool = False


def load_run_view(
    run_dir: Path, step: int | None = None, task: str | None = None, episode: int | None = None, turn: int | None = None
) -> GateView:
    """Read a run's gate records: the selected step (default the latest) and up to MAX_REPORT_STEPS others
    (for the HTML step selector and the plots; a damaged one of those is left out)."""
    available = gate_steps(run_dir)
    step = pick_step(available, step, run_dir)
    selected = select_or_explain(read_records(gate_file(run_dir, step)), step, task, episode, turn)
    steps = {step: selected}
    for other in report_steps(available, step):
        if other != step:
            try:
                records = select(read_records(gate_file(run_dir, other)), task, episode, turn)
            except GateDataError:  # another step's damaged file must not hide the step asked for
                continue
            if records:
                steps[other] = records
    return GateView(str(run_dir), step, selected, dict(sorted(steps.items())), read_metrics(run_dir))


def training_curve(view: GateView) -> list[dict[str, Any]]:
    """Mean gate, active ratio and mean gap per step: from metrics.jsonl, else from the records shown."""
    rows = [row for row in view.metrics if row.get("gate_mean") is not None]
    if rows:
        return [
            {"step": row["step"], "gate_mean": row["gate_mean"], "active_ratio": row.get("gate_active_ratio"), "gap_mean": row.get("teacher_gap_mean")}
            for row in rows
        ]
    curve = []
    for step, records in view.steps.items():
        summary = summarize(records)
        curve.append({"step": step, "gate_mean": summary.gate_mean, "active_ratio": summary.active_ratio, "gap_mean": summary.gap_mean})
    return curve


def gate_color(gate: float) -> str:
    """The '#rrggbb' of a gate value on GATE_RAMP (linear between the stops; clamped to [0, 1])."""
    gate = min(max(gate, 0.0), 1.0)
    for (low, low_rgb), (high, high_rgb) in zip(GATE_RAMP, GATE_RAMP[1:]):
        if gate <= high:
            w = (gate - low) / (high - low)
            return "#" + "".join(f"{round(a + w * (b - a)):02x}" for a, b in zip(low_rgb, high_rgb))
    return "#" + "".join(f"{c:02x}" for c in GATE_RAMP[-1][1])


def visible_token(token: str) -> str:
    """A token as shown: a line break becomes ⏎ and other control characters their Unicode picture
    (tab: ␉), so a turn stays on its lines."""
    return "".join("⏎" if ch == "\n" else chr(0x2400 + ord(ch)) if ord(ch) < 32 else ch for ch in token)


def coloured_tokens(record: GateRecord) -> Text:
    text = Text("    ")
    for token, gate in zip(record.tokens, record.gate):
        text.append(visible_token(token), style=f"#000000 on {gate_color(gate)}")
    return text


def legend() -> Text:
    text = Text("gate ")
    for fifth in range(6):
        text.append(f" {fifth / 5:.1f} ", style=f"#000000 on {gate_color(fifth / 5)}")
    text.append("  (0 rejected, 1 endorsed)")
    return text


def print_gates(console: Console, view: GateView, limit: int = 4) -> None:
    """The tokens of up to `limit` episodes coloured by gate, then the statistics of the selection."""
    summary = summarize(view.records)
    kind = "fresh rollouts of" if view.fresh else "run"
    console.print(
        f"[bold]Gates of {kind} {view.source}, step {view.step}[/bold]: {_count(summary.turn_samples, 'turn-sample')} "
        f"in {_count(summary.episodes, 'episode')}, {_count(summary.tokens, 'token')}, beta {summary.beta:g}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(legend())
    console.print("[dim]Observations are not stored in gate records; each turn shows its action and reward.[/dim]")
    episodes: dict[int, list[GateRecord]] = {}
    for record in view.records:
        episodes.setdefault(record.episode, []).append(record)
    for number, (episode, records) in enumerate(episodes.items()):
        if number == limit:
            console.print(
                f"[dim]... {_count(len(episodes) - limit, 'more episode')}: pick one with --episode E "
                f"(episodes {_ranges(sorted(episodes))}), or write them all with --html PATH.[/dim]"
            )
            break
        first = records[0]
        console.print(f"\n[bold]episode {episode}[/bold]  {first.task_id} ({first.task_type})", highlight=False)
        for record in sorted(records, key=lambda r: r.turn):
            console.print(_turn_header(record), highlight=False, soft_wrap=True)
            console.print(coloured_tokens(record))
    console.print()
    console.print(summary_tables(summary))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _turn_header(record: GateRecord) -> str:
    action = "no action" if record.action is None else repr(record.action)
    validity = "valid" if record.valid else "invalid"
    return (
        f"  turn {record.turn}  action {action} ({validity})  reward {record.reward:.2f}  "
        f"advantage {record.advantage:+.2f}  mean gate {_mean(record.gate):.3f}"
    )


def summary_tables(summary: GateSummary) -> Group:
    totals = Table(title="summary", title_justify="left", show_header=False)
    totals.add_column()
    totals.add_column(justify="right")
    totals.add_row("tokens", str(summary.tokens))
    totals.add_row("mean gate", f"{summary.gate_mean:.3f}")
    totals.add_row(f"active (gate > {ACTIVE_GATE})", f"{summary.active_ratio:.1%}")
    totals.add_row("mean gap T - S", f"{summary.gap_mean:+.3f}")

    histogram = Table(title="gate histogram", title_justify="left", show_header=False)
    histogram.add_column()
    histogram.add_column()
    histogram.add_column(justify="right")
    widest = max(summary.histogram) or 1
    for i, count in enumerate(summary.histogram):
        bar = Text("█" * round(24 * count / widest), style=gate_color((i + 0.5) / len(summary.histogram)))
        histogram.add_row(f"{i / 10:.1f}-{(i + 1) / 10:.1f}", bar, str(count))

    turns = Table(title="by turn", title_justify="left")
    for column in ("turn", "samples", "tokens", "mean gate", "active"):
        turns.add_column(column, justify="right")
    for stat in summary.turns:
        turns.add_row(str(stat.turn), str(stat.samples), str(stat.tokens), f"{stat.gate_mean:.3f}", f"{stat.active_ratio:.0%}")

    return Group(totals, histogram, turns, _token_table("most endorsed tokens", summary.endorsed),
                 _token_table("most rejected tokens", summary.rejected))


def _token_table(title: str, stats: Sequence[TokenStat]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("token", "count", "mean gate", "mean gap"):
        table.add_column(column, justify="left" if column == "token" else "right")
    for stat in stats:
        table.add_row(Text(repr(stat.token)), str(stat.count), f"{stat.gate_mean:.3f}", f"{stat.gap_mean:+.3f}")
    return table
