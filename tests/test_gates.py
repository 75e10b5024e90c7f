"""`sdar inspect-gates`: reading gate records, their statistics, the terminal view, HTML and PNG."""

from __future__ import annotations

import html
import json
import math
import re
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.gates import (
    GateDataError,
    GateRecord,
    gate_color,
    gate_histogram,
    load_run_view,
    parse_record,
    report_steps,
    select,
    summarize,
    token_stats,
)
from sdar_cli.gates.html_report import report_data

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_threaded_torch")
BETA = 5.0


def make_record(step, episode, turn, tokens, student, teacher, task_type="pick_and_place", action="go to kitchen"):
    gate = [1 / (1 + math.exp(-BETA * (t - s))) for s, t in zip(student, teacher)]
    return GateRecord(step=step, task_id=f"train-{episode:05d}", task_type=task_type, episode=episode, turn=turn,
                      tokens=tokens, student_logp=student, teacher_logp=teacher, gate=gate, advantage=0.5,
                      reward=-0.1 if action is None else 10.0, beta=BETA, action=action, valid=action is not None)


def write_run(run_dir: Path, steps: dict[int, list[GateRecord]]) -> Path:
    """A run directory as training leaves it: gates/step-N.jsonl and metrics.jsonl with the gate metrics."""
    (run_dir / "gates").mkdir(parents=True)
    rows = []
    for step, records in steps.items():
        lines = [json.dumps({**r.model_dump(), "mask": [1] * len(r.tokens)}) for r in records]
        (run_dir / "gates" / f"step-{step}.jsonl").write_text("\n".join(lines) + "\n")
        summary = summarize(records)
        rows.append({"step": step, "gate_mean": summary.gate_mean, "gate_active_ratio": summary.active_ratio,
                     "teacher_gap_mean": summary.gap_mean})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


# gaps T - S per record: (+1, -1, 0), (+0.2, 0), (0, +0.4); gates sigmoid(5 * gap): 0.9933, 0.0067, 0.5, ...
STEP_ONE = [
    make_record(1, 0, 0, ["<action>", "go", " kitchen"], [-2.0, -1.0, -3.0], [-1.0, -2.0, -3.0]),
    make_record(1, 0, 1, ["go", "</action>"], [-1.0, -0.5], [-0.8, -0.5], action=None),
    make_record(1, 1, 0, ["look", "</action>"], [-4.0, -0.5], [-4.0, -0.1], task_type="pick_two", action="look"),
]
STEP_TWO = [make_record(2, 2, 0, ["open", " fridge"], [-1.0, -1.0], [-0.5, -3.0], action="open fridge 1")]


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    return write_run(tmp_path / "run", {1: STEP_ONE, 2: STEP_TWO})


def test_summary_matches_hand_computed_statistics():
    summary = summarize(STEP_ONE)
    gaps = [1.0, -1.0, 0.0, 0.2, 0.0, 0.0, 0.4]
    gates = [1 / (1 + math.exp(-BETA * d)) for d in gaps]
    assert (summary.turn_samples, summary.episodes, summary.tokens, summary.beta) == (3, 2, 7, 5.0)
    assert summary.gap_mean == pytest.approx(0.6 / 7)
    assert summary.gate_mean == pytest.approx(sum(gates) / 7)
    assert summary.active_ratio == pytest.approx(3 / 7)  # gate > 0.5 strictly: the three zero gaps are not active
    # gates 0.9933, 0.0067, 0.5 x3, 0.7311, 0.8808 -> bins 9, 0, 5 (x3), 7, 8
    assert summary.histogram == [1, 0, 0, 0, 0, 3, 0, 1, 1, 1]
    assert [(t.turn, t.samples, t.tokens) for t in summary.turns] == [(0, 2, 5), (1, 1, 2)]
    assert summary.turns[1].gate_mean == pytest.approx((gates[3] + 0.5) / 2)


def test_token_ranking_orders_by_mean_gap_among_repeated_tokens():
    ranked = token_stats(STEP_ONE)
    # only "</action>" (gaps 0, +0.4) and "go" (-1, +0.2) occur twice
    assert [(s.token, s.count) for s in ranked] == [("</action>", 2), ("go", 2)]
    assert ranked[0].gap_mean == pytest.approx(0.2) and ranked[1].gap_mean == pytest.approx(-0.4)
    summary = summarize(STEP_ONE)
    assert [s.token for s in summary.endorsed] == ["</action>"] and [s.token for s in summary.rejected] == ["go"]
    every_token = [s.token for s in token_stats(STEP_ONE, min_count=1)]
    assert every_token == ["<action>", "</action>", " kitchen", "look", "go"]


def test_histogram_bins_and_colour_ramp_ends():
    assert gate_histogram([0.0, 0.05, 0.1, 0.5, 0.99, 1.0], bins=10) == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert gate_color(0.0) == "#f46d43" and gate_color(0.5) == "#ffffbf" and gate_color(1.0) == "#66bd63"
    assert gate_color(0.25) == "#fab681"  # halfway between (244,109,67) and (255,255,191)


def test_report_steps_keep_first_last_and_selected():
    steps = report_steps(list(range(1, 101)), selected=37)
    assert len(steps) <= 20 and {1, 37, 100} <= set(steps) and steps == sorted(steps)
    assert report_steps([1, 2, 3], selected=2) == [1, 2, 3]


def test_filters_and_records_written_by_training(tiny_run_dir):
    view = load_run_view(tiny_run_dir)
    assert view.step == 1 and set(view.steps) == {1}
    metrics = json.loads((tiny_run_dir / "metrics.jsonl").read_text().splitlines()[0])
    summary = summarize(view.records)
    assert summary.turn_samples == metrics["turn_samples"]
    assert summary.gate_mean == pytest.approx(metrics["gate_mean"], abs=1e-6)
    assert summary.active_ratio == pytest.approx(metrics["gate_active_ratio"], abs=1e-6)
    assert summary.gap_mean == pytest.approx(metrics["teacher_gap_mean"], abs=1e-6)
    first = view.records[0]
    only = select(view.records, task=first.task_id, episode=first.episode, turn=0)
    assert [(r.task_id, r.episode, r.turn) for r in only] == [(first.task_id, first.episode, 0)]
    assert all(r.task_type == first.task_type for r in select(view.records, task=first.task_type))


def test_terminal_view_shows_tokens_actions_and_statistics(synthetic_run):
    result = runner.invoke(app, ["inspect-gates", str(synthetic_run), "--step", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Gates of run" in out and "step 1" in out and "3 turn-samples in 2 episodes, 7 tokens, beta 5" in out
    assert "<action>go kitchen" in out  # the tokens of episode 0, turn 0
    assert "action 'go to kitchen' (valid)" in out and "action no action (invalid)" in out
    assert "Observations are not stored" in out
    assert "active (gate > 0.5)" in out and "42.9%" in out  # 3 of 7
    assert "+0.086" in out  # mean gap 0.6 / 7
    assert "most endorsed tokens" in out and "most rejected tokens" in out
    latest = runner.invoke(app, ["inspect-gates", str(synthetic_run), "--task", "pick_and_place"])
    assert latest.exit_code == 0 and "step 2" in latest.output and "open fridge 1" in latest.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--step", "9"], "Step 9 has no gate records"),
        (["--step", "9"], "steps with records: 1-2"),
        (["--step", "1", "--episode", "7"], "No gate record of step 1 matches episode 7"),
        (["--step", "1", "--task", "nothing"], "task types pick_and_place, pick_two"),
    ],
)
def test_bad_selections_exit_2(synthetic_run, args, message):
    result = runner.invoke(app, ["inspect-gates", str(synthetic_run), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_runs_without_usable_records_exit_2(tmp_path):
    no_gates = tmp_path / "grpo-run"
    no_gates.mkdir()
    (no_gates / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    result = runner.invoke(app, ["inspect-gates", str(no_gates)])
    assert result.exit_code == 2 and "has no gate records" in " ".join(result.output.split())

    damaged = write_run(tmp_path / "damaged", {1: STEP_ONE})
    path = damaged / "gates" / "step-1.jsonl"
    path.write_text(path.read_text().splitlines()[0] + '\n{"step": 1, "tok\n')
    result = runner.invoke(app, ["inspect-gates", str(damaged)])
    assert result.exit_code == 2 and "step-1.jsonl, line 2: not valid JSON" in " ".join(result.output.split())

    path.write_text(json.dumps({"step": 1, "tokens": []}) + "\n")
    result = runner.invoke(app, ["inspect-gates", str(damaged)])
    assert result.exit_code == 2 and "not a gate record (missing task_id" in " ".join(result.output.split())

    (damaged / "gates" / "step-3.jsonl").mkdir()  # unreadable as a file
    result = runner.invoke(app, ["inspect-gates", str(damaged), "--step", "3"])
    assert result.exit_code == 2 and "Cannot read" in result.output and "Traceback" not in result.output
    with pytest.raises(GateDataError, match="Cannot read"):
        load_run_view(damaged, 3)


def test_report_data_holds_every_step_and_the_training_curve(synthetic_run):
    data = report_data(load_run_view(synthetic_run))
    assert data["selected"] == 2 and [s["step"] for s in data["steps"]] == [1, 2]
    first = data["steps"][0]
    assert first["summary"]["histogram"] == [1, 0, 0, 0, 0, 3, 0, 1, 1, 1]
    assert first["records"][0]["tokens"] == ["<action>", "go", " kitchen"]
    assert first["records"][0]["g"] == [0.9933, 0.0067, 0.5]
    assert [row["step"] for row in data["curve"]] == [1, 2]
    assert data["curve"][0]["gap_mean"] == pytest.approx(0.6 / 7)


CHROMIUM = shutil.which("chromium")
# after the page's own scripts: choose step 1 in the selector and hover the first token, as a reader would
READER = """<script>
const select = document.getElementById("step");
select.value = "0";
select.dispatchEvent(new Event("change"));
const token = document.querySelector(".tok[data-r]");
const box = token.getBoundingClientRect();
token.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: box.left + 2, clientY: box.top + 2}));
</script></body>"""


def rendered_dom(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium (no network, throwaway profile)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--dump-dom",
               page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def tokens_on_page(dom: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r'<span class="tok" data-r="\d+" data-t="\d+" style="[^"]*">([^<]*)</span>', dom)]


# skipped on a developer machine without Chromium; CI (CI=true) installs it and never skips
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Chromium: apt-get install -y chromium")
def test_html_report_renders_in_chromium(synthetic_run, tmp_path):
    page = tmp_path / "gates.html"
    result = runner.invoke(app, ["inspect-gates", str(synthetic_run), "--html", str(page)])
    assert result.exit_code == 0, result.output
    source = page.read_text()
    assert "<link" not in source and " src=" not in source and "https://" not in source  # self-contained

    dom = rendered_dom(page, tmp_path / "profile")
    assert re.search(r'<option value="0">step 1</option><option value="1">step 2</option>', dom)
    assert tokens_on_page(dom) == ["open", " fridge"]  # the latest step is shown first
    assert "open fridge 1" in dom and "Gates of run" in dom
    assert "<svg" in dom and "<rect" in dom and "<polyline" in dom  # histogram, by-turn and curve charts

    reader_page = tmp_path / "reader.html"
    reader_page.write_text(source.replace("</body>", READER))
    dom = rendered_dom(reader_page, tmp_path / "profile")
    assert tokens_on_page(dom) == ["<action>", "go", " kitchen", "go", "</action>", "look", "</action>"]
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</div></div>', dom).group(0)
    assert "hidden" not in tip.split(">")[0]
    for line in ("student log-prob S: <b>-2.000</b>", "teacher log-prob T: <b>-1.000</b>", "gap T - S: <b>+1.000</b>",
                 "gate: <b>0.993</b>", "advantage: <b>+0.500</b>"):
        assert line in tip


def test_png_has_the_three_plots(synthetic_run, tmp_path):
    png = tmp_path / "plots" / "gates.png"
    result = runner.invoke(app, ["inspect-gates", str(synthetic_run), "--png", str(png)])
    assert result.exit_code == 0, result.output
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1500, 420)  # 15 x 4.2 inches at 100 dpi: three panels


def test_score_responses_equal_unpadded_forward_passes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sdar_cli.logprobs import score_responses

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, responses = [[5, 6, 7, 8, 9], [10, 11]], [[12, 13], [14, 15, 16, 17]]
    batched = score_responses(model, prompts, responses, pad_id=0, batch_size=2, temperature=1.0)
    for prompt, response, row in zip(prompts, responses, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
        assert row == pytest.approx(expected.tolist(), abs=1e-4)


def test_fresh_gates_of_a_checkpoint(tiny_run_dir, tmp_path):
    page = tmp_path / "fresh.html"
    checkpoint = tiny_run_dir / "checkpoint-1"
    result = runner.invoke(app, ["inspect-gates", str(checkpoint), "--episodes", "2", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "Gates of fresh rollouts of" in result.output and "step 1" in result.output
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text()).group(1))
    (step,) = data["steps"]
    records = step["records"]
    assert step["step"] == 1 and {r["episode"] for r in records} == {0, 1}
    assert all(r["turn"] < 3 for r in records)  # the run's rollout.max_turns
    gaps = [t - s for r in records for s, t in zip(r["s"], r["t"])]
    assert any(abs(gap) > 1e-4 for gap in gaps)  # the teacher sees the privileged plan
    for r in records:
        for s, t, g in zip(r["s"], r["t"], r["g"]):
            assert g == pytest.approx(1 / (1 + math.exp(-BETA * (t - s))), abs=1e-3)


def test_fresh_gates_score_with_the_training_head_at_the_rollout_temperature(tiny_model_dir, tmp_path):
    from conftest import build_trainer, task_inputs, tiny_config
    from transformers import AutoModelForCausalLM

    from sdar_cli.logprobs import score_responses

    config = tiny_config(tiny_model_dir, tmp_path / "run", "rollout.temperature=0.7")
    trainer, _ = build_trainer(config, tmp_path / "run")
    batch = trainer._generate_and_score_completions(task_inputs(config))
    rows = [i for i in range(batch["sample_index"].numel()) if batch["sample_index"][i] >= 0]
    prompts = [batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist() for i in rows]
    responses = [batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist() for i in rows]
    training = [batch["ref_per_token_logps"][i][: len(r)].tolist() for i, r in zip(rows, responses)]  # adapter off

    for temperature, equal in ((0.7, True), (1.0, False)):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        probed = score_responses(base, prompts, responses, trainer.processing_class.pad_token_id, 3, temperature)
        same = all(p == pytest.approx(t, abs=1e-4) for p, t in zip(probed, training))
        assert same == equal


def test_gate_records_of_earlier_versions_load_and_bad_ones_are_explained(tmp_path):
    # the first gates files had neither token_ids, mask nor the teacher settings
    first_version = {"step": 3, "task_id": "train-00001", "task_type": "pick", "episode": 1, "turn": 0,
                     "tokens": ["go", " north"], "student_logp": [-1.0, -2.0], "teacher_logp": [-0.5, -2.5],
                     "gate": [0.9, 0.1], "advantage": 1.5, "reward": 10, "beta": 5.0, "action": None, "valid": False}
    record = parse_record(first_version, "here")
    assert record.token_ids == [] and record.mask is None and record.teacher_placement is None
    assert record.reward == 10.0 and record.action is None and record.gaps == [0.5, -0.5]
    # written and read back through the one schema, with every field it had
    written = json.loads(record.to_json_line())
    assert {key: written[key] for key in first_version} == first_version
    assert parse_record(written, "here") == record
    with pytest.raises(GateDataError, match="here: tokens, student_logp, teacher_logp and gate differ in length"):
        parse_record({**first_version, "gate": [0.9]}, "here")
    with pytest.raises(GateDataError, match=r"here: not a gate record \(episode: "):
        parse_record({**first_version, "episode": "first"}, "here")
