"""`sdar inspect-gates --html`: one self-contained HTML file (inline CSS, JS and SVG; no network).
The page's HTML, CSS and JS are package data in `sdar_cli/gates/report/`; this module fills in the data.

The page holds the data of up to MAX_REPORT_STEPS steps as JSON and draws, for the step chosen in
its step selector: summary numbers, the gate histogram, the mean gate by turn, the most endorsed
and rejected tokens, and every episode's turns with the tokens coloured by gate. Hovering a token
shows its student and teacher log-probs, the gap, the gate and the turn's advantage. A chart of
the mean gate, active ratio and mean gap over training steps comes from metrics.jsonl.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from . import ACTIVE_GATE, GATE_RAMP, GateRecord, GateView, TokenStat, summarize, training_curve, visible_token


def _round(values: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]


def _record_data(record: GateRecord) -> dict[str, Any]:
    return {
        "task_id": record.task_id,
        "task_type": record.task_type,
        "episode": record.episode,
        "turn": record.turn,
        "action": record.action,
        "valid": record.valid,
        "reward": round(record.reward, 4),
        "advantage": round(record.advantage, 4),
        "tokens": [visible_token(token) for token in record.tokens],
        "s": _round(record.student_logp),
        "t": _round(record.teacher_logp),
        "g": _round(record.gate),
    }


def _token_data(stat: TokenStat) -> dict[str, Any]:
    return {"token": visible_token(stat.token), "count": stat.count, "gate": round(stat.gate_mean, 4), "gap": round(stat.gap_mean, 4)}


def _step_data(step: int, records: list[GateRecord]) -> dict[str, Any]:
    summary = summarize(records)
    return {
        "step": step,
        "summary": {
            "turn_samples": summary.turn_samples,
            "episodes": summary.episodes,
            "tokens": summary.tokens,
            "gate_mean": round(summary.gate_mean, 4),
            "active_ratio": round(summary.active_ratio, 4),
            "gap_mean": round(summary.gap_mean, 4),
            "beta": summary.beta,
            "histogram": summary.histogram,
            "turns": [{"turn": t.turn, "gate_mean": round(t.gate_mean, 4), "active_ratio": round(t.active_ratio, 4)} for t in summary.turns],
            "endorsed": [_token_data(s) for s in summary.endorsed],
            "rejected": [_token_data(s) for s in summary.rejected],
        },
        "records": [_record_data(r) for r in sorted(records, key=lambda r: (r.episode, r.turn))],
    }


def report_data(view: GateView) -> dict[str, Any]:
    """Everything the page draws, as JSON-ready data."""
    return {
        "source": view.source,
        "fresh": view.fresh,
        "selected": view.step,
        "active_gate": ACTIVE_GATE,
        "ramp": [[stop, list(rgb)] for stop, rgb in GATE_RAMP],
        "steps": [_step_data(step, records) for step, records in view.steps.items()],
        "curve": training_curve(view),
    }


def render_html(view: GateView) -> str:
    data = json.dumps(report_data(view), separators=(",", ":"), ensure_ascii=False)
    # "</" inside the JSON would end the <script> element early
    data = data.replace("</", "<\\/")
    title = f"sdar gates: {view.source}"
    return (
        _asset("page.html").replace("__TITLE__", html.escape(title))
        .replace("__STYLE__", _asset("style.css"))
        .replace("__SCRIPT__", _asset("script.js"))
        .replace("__DATA__", data)
    )


def _asset(name: str) -> str:
    """A file of the page's template (package data in sdar_cli/gates/report/: page.html, style.css, script.js)."""
    return resources.files("sdar_cli.gates").joinpath("report", name).read_text(encoding="utf-8")


def write_html(path: Path, view: GateView) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(view), encoding="utf-8")
