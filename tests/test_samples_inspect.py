"""Rollout records (``<run>/samples/``), ``python -m launch.inspect`` and its HTML report rendered in headless Chromium.

The Chromium tests need Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it). Without it
they fail, naming the package; ``UNICTASK_SKIP_BROWSER=1`` skips them explicitly.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.telemetry import samples as records
from actors.telemetry.report import REPORT_FILE, build_report, pick_steps
from actors.telemetry.samples import display_text
from rl.grpo.batch import RolloutSample, per_sample_attempts

REPO = Path(__file__).resolve().parents[1]
EXPERTS = ["tier", "ber", "der", "fer"]
BASE_COLUMNS = [c for c in records.COLUMNS if c != "reward_<expert>"]
COLOURS = [(200, 40, 40), (40, 160, 60), (30, 60, 200)]


def _sample(step: int, p: int, i: int, reward: float, forced: bool = False, scores=(0.41,), human=True):
    img = np.zeros((64, 48, 3), np.uint8)
    img[:] = COLOURS[i % 3]
    img[: 8 * (i + 1)] = 255   # a white band whose height tells the samples apart
    img[-1, :, 1] = step        # and a last row that tells the steps apart
    rewards = {"tier": 0.5 + 0.1 * i, "ber": 0.3, "der": 0.2 + 0.05 * i}
    if human:
        rewards["fer"] = 0.7
    return RolloutSample(
        step=step, prompt_index=p, sample_index=i, concept="astro" if human else "chelsea",
        category="human" if human else "animal", task_kind="visual" if i % 2 == 0 else "text",
        mmu_input_ids=np.arange(7, dtype=np.int64), answer_ids=np.arange(5, dtype=np.int64),
        answer_logps=np.zeros(5, np.float32), answer_text=f"<astro> wears a white suit | {i}",
        prompt_text="A photo of <token_0><token_1><token_2><astro>.\nastro is an astronaut. <astro> wears a suit",
        prompt_cut=i == 2, t2i_input_ids=np.zeros(9, np.int64), uncond_input_ids=np.zeros(9, np.int64),
        states=np.zeros((3, 4), np.int64), chosen=np.zeros((3, 4), np.int64), image_logps=np.zeros((3, 4), np.float32),
        final_ids=np.zeros(4, np.int64), image=img, screen_score=float(max(scores)) if scores else float("nan"),
        attempts=max(len(scores), 1), rewards=rewards, reward=0.25 + 0.125 * i + reward, advantage=0.125 * i - 0.125,
        question="What is <astro> wearing?", reference="<astro> is wearing a white space suit.",
        input_image="0.png", reward_text="A photo of astronaut. astro is an astronaut. astronaut wears a suit",
        attempt_scores=list(scores), forced=forced).validate()


def _step_samples(step: int) -> list[RolloutSample]:
    return [_sample(step, 0, 0, 0.01 * step), _sample(step, 0, 1, 0.01 * step, scores=(0.12, 0.44)),
            _sample(step, 0, 2, 0.01 * step, forced=True, scores=(0.1, 0.2, 0.15))]


def _fake_run(tmp_path: Path, steps: int = 3) -> Path:
    """A run folder with metrics.jsonl and the sample records of ``steps`` steps, written by the real writer."""
    run = tmp_path / "fake-run"
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as fh:
        for s in range(steps):
            fh.write(json.dumps({"step": s, "reward/total": 0.4 + 0.01 * s, "reward/std": 0.1, "reward/tier": 0.6,
                                 "reward/ber": 0.3, "reward/der": 0.25, "reward/fer": 0.7, "adv/std": 0.1,
                                 "dsog/pass_rate": 0.5, "dsog/threshold": 0.3 if s else float("nan"),
                                 "dsog/attempts_per_sample": 2.0, "dsog/forced_keeps": 1.0, "learn/kl": 1e-4 * s,
                                 "concepts": "astro"}) + "\n")
    for s in range(steps):
        records.write_samples(run, s + 1, _step_samples(s), experts=EXPERTS, threshold=0.3 if s else None)
    return run


# -- the records -----------------------------------------------------------------------------------------------
def test_per_sample_attempts_splits_the_attempt_major_log():
    # round 0: samples 0, 1, 2; round 1: samples 1, 2; round 2: sample 2 (attempts 1, 2, 3)
    scores = [0.5, 0.1, 0.2, 0.6, 0.25, 0.22]
    passed = [True, False, False, True, False, False]
    assert per_sample_attempts(scores, passed, [1, 2, 3]) == [
        ([0.5], False), ([0.1, 0.6], False), ([0.2, 0.25, 0.22], True)]
    assert per_sample_attempts([], [], [1, 1]) == [([], False), ([], False)]   # DSOG off
    with pytest.raises(ValueError, match="per_sample_attempts"):
        per_sample_attempts(scores, passed, [1, 1, 3])


def test_step_records_hold_every_column_and_open_in_pandas(tmp_path):
    run = _fake_run(tmp_path, steps=2)
    assert records.list_steps(run) == [1, 2]
    path = records.step_file(run, 2)
    assert path.name == "step_000002.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    expected = BASE_COLUMNS[:BASE_COLUMNS.index("reward")] + [f"reward_{e}" for e in EXPERTS] + \
        BASE_COLUMNS[BASE_COLUMNS.index("reward"):]
    assert all(list(r) == expected for r in rows)
    r0, r1, r2 = rows
    assert (r0["step"], r0["task"], r1["task"]) == (2, "visual-instruct", "text-only")
    assert (r0["dsog"], r1["dsog"], r2["dsog"]) == ("kept", "redrawn", "forced")
    assert r2["attempt_scores"] == [0.1, 0.2, 0.15] and r2["attempts"] == 3 and r2["screen_score"] == 0.2
    assert r1["reward_tier"] == pytest.approx(0.6) and r0["reward_fer"] == 0.7 and r0["threshold"] == 0.3
    assert r2["advantage"] == 0.125 and r2["prompt_cut"] is True and r0["answer_tokens"] == 5
    assert r0["question"] == "What is <astro> wearing?" and "<token_0>" in r0["compound_prompt"]
    with Image.open(records.samples_dir(run) / r1["image"]) as im:   # the kept image, bit for bit
        assert np.array_equal(np.asarray(im), _step_samples(1)[1].image)
    first = json.loads(records.step_file(run, 1).read_text().splitlines()[0])
    assert first["threshold"] is None and first["step"] == 1   # uncalibrated: null, not NaN (JSON has no NaN)
    pd = pytest.importorskip("pandas")
    df = pd.read_json(path, lines=True)
    assert list(df.columns) == expected and len(df) == 3 and df["reward"].tolist() == [r["reward"] for r in rows]


def test_an_animal_step_has_null_for_the_face_expert_and_no_nan(tmp_path):
    run = tmp_path / "r"
    records.write_samples(run, 1, [_sample(0, 0, 0, 0.0, human=False)], experts=EXPERTS, threshold=float("nan"))
    text = records.step_file(run, 1).read_text()
    row = json.loads(text)
    assert row["reward_fer"] is None and row["threshold"] is None and "NaN" not in text


def test_what_a_random_policy_samples_is_recorded_and_shown_safely(tmp_path):
    s = _sample(0, 0, 0, 0.0)
    s.answer_text = "cat\x12\x07 is\ud800 <token_3><token_4> here"   # control characters, a lone surrogate
    records.write_samples(tmp_path, 1, [s], experts=EXPERTS)
    _, (row,) = records.read_samples(tmp_path, 1)
    assert row["answer"] == "cat\x12\x07 is? <token_3><token_4> here"
    assert display_text(row["answer"]) == "cat\ufffd\ufffd is? ‹2 tokens› here"
    assert "cat\ufffd\ufffd is?" in records.format_table([row]) and "\x12" not in records.format_details([row])


def test_writes_are_atomic_and_a_rewound_run_drops_later_steps(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, steps=3)
    before = records.step_file(run, 3).read_bytes()
    real = records._png

    def dying(image):   # killed mid-step: after one image, before the JSONL
        monkeypatch.setattr(records, "_png", lambda image: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real(image)

    monkeypatch.setattr(records, "_png", dying)
    with pytest.raises(KeyboardInterrupt):
        records.write_samples(run, 3, _step_samples(7), experts=EXPERTS)
    assert records.step_file(run, 3).read_bytes() == before   # the old file stays whole
    assert not [p for p in records.samples_dir(run).rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(records, "_png", real)
    records.write_samples(run, 2, _step_samples(1), experts=EXPERTS)   # a rewind to step 2
    assert records.list_steps(run) == [1, 2] and not (records.samples_dir(run) / "step_000003").exists()
    assert records.due(0, 1) and records.due(4, 5) and not records.due(3, 5) and not records.due(0, 0)


def test_read_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^no run folder .*nowhere$"):
        records.read_samples(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no sample records"):
        records.read_samples(tmp_path / "empty")
    run = _fake_run(tmp_path, steps=2)
    with pytest.raises(FileNotFoundError, match=r"step 9 has no sample records \(recorded steps: 1, 2\)"):
        records.read_samples(run, 9)


# -- trackers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_trackers_show_the_records(tmp_path, monkeypatch, name):
    """TensorBoard gets a text table, wandb a Table with the images, MLflow the JSONL and PNGs as artifacts."""
    from types import SimpleNamespace

    from actors.telemetry.logger import MetricsLogger
    from actors.telemetry.trackers import make_trackers
    from configs.trackers import TrackerConfig

    if name != "tensorboard":
        pytest.importorskip(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _fake_run(tmp_path, steps=2)
    rc = SimpleNamespace(name="rec", trackers=[name], tracker=TrackerConfig())
    trackers = make_trackers(rc, run, {"run": {"name": "rec"}})
    logger = MetricsLogger(run, ray_metrics=False, tensorboard=name == "tensorboard", trackers=trackers)
    for step in (1, 2):
        logger.log_samples(records.step_file(run, step), records.read_samples(run, step)[1], step - 1)
    assert not any(t.failed for t in trackers)
    if name == "mlflow":
        (mlf,) = trackers
        arts = {a.path for a in mlf.client.list_artifacts(mlf.run_id, "samples")}
        assert {"samples/step_000001.jsonl", "samples/step_000002.jsonl", "samples/step_000002"} <= arts
        pngs = {a.path for a in mlf.client.list_artifacts(mlf.run_id, "samples/step_000002")}
        assert pngs == {f"samples/step_000002/p000_s0{i}.png" for i in range(3)}
    logger.close()
    if name == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
        acc.Reload()
        events = acc.Tensors("samples/text_summary")
        assert [e.step for e in events] == [0, 1]
        text = events[1].tensor_proto.string_val[0].decode()
        assert "| sample | concept | task | question |" in text and "| 0.5100 | +0.1250 | forced (3) |" in text
    elif name == "wandb":
        (folder,) = (run / "wandb").glob("offline-run-*")
        tables = list(folder.glob("files/media/table/samples_*.table.json"))
        assert len(tables) == 2, list(folder.rglob("*"))
        table = json.loads(sorted(tables)[-1].read_text())
        assert table["columns"][:3] == ["step", "prompt_index", "sample_index"] and table["columns"][-1] == "picture"
        assert len(table["data"]) == 3 and table["data"][2][table["columns"].index("dsog")] == "forced"
        assert len(list(folder.glob("files/media/images/samples_images_*.png"))) == 6   # offline: images beside


# -- launch.inspect --------------------------------------------------------------------------------------------
def _inspect(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "launch.inspect", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_inspect_prints_the_steps_table_and_writes_a_report(tmp_path):
    run = _fake_run(tmp_path, steps=3)
    out = _inspect(run, "--width", "150", "--step", "2", "--full")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("step 2: 3 samples of astro, mean reward")
    assert lines[1] == ("group 0: astro, visual-instruct: What is <astro> wearing? -> reference: <astro> is wearing a "
                        "white space suit.")
    assert re.split(r"\s+", lines[2].strip()) == ["p/s", "concept", "task", "tier", "ber", "der", "fer", "R", "A",
                                                  "dsog", "att", "screen", "answer", "(IR)"]
    assert re.match(r"0/2\s+astro\s+visual\s+0\.700\s+0\.300\s+0\.300\s+0\.700\s+0\.5100\s+\+0\.1250\s+forced\s+3\s+"
                    r"0\.200\s+<astro> wears a white suit \| 2$", lines[6]), lines[6]
    assert all(len(line) <= 150 for line in lines[1:7])
    assert "question: What is <astro> wearing?" in out.stdout and "reward_text: A photo of astronaut." in out.stdout
    assert out.stdout.rstrip().endswith(f"report: {run / REPORT_FILE}")
    default = _inspect(run, "--no-html")   # the last step by default
    assert default.returncode == 0 and default.stdout.startswith("step 3: 3 samples")
    assert "report:" not in default.stdout


def test_inspect_errors_are_one_line(tmp_path):
    for args, msg in (([tmp_path / "missing"], "no run folder"), ([tmp_path], "has no sample records"),
                      ([_fake_run(tmp_path, 1), "--step", "5"], "step 5 has no sample records")):
        out = _inspect(*args)
        assert out.returncode == 2 and out.stdout == "", out
        assert len(out.stderr.strip().splitlines()) == 1 and msg in out.stderr, out.stderr


def test_inspect_help_has_examples_and_imports_nothing_heavy():
    probe = ("import runpy, sys\nsys.argv = ['x', '--help']\ntry:\n    runpy.run_module('launch.inspect', "
             "run_name='__main__')\nexcept SystemExit as exc:\n    assert exc.code in (0, None)\n"
             "print('HEAVY:', sorted(m for m in ('torch', 'ray', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("usage: python -m launch.inspect ") and "examples:" in out.stdout
    assert out.stdout.rstrip().endswith("HEAVY: []"), out.stdout[-300:]


def test_report_pieces():
    assert display_text("A photo of <token_0><token_1> <astro>.\n x") == "A photo of ‹2 tokens› <astro>. x"
    assert display_text("<cat_token_4>Behind") == "<cat_token_4>Behind"   # a single token stays readable
    assert pick_steps(list(range(1, 101)), 5) == [1, 26, 51, 75, 100] and pick_steps([1, 2], 0) == [1, 2]


# -- the HTML report in headless Chromium ------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("UNICTASK_SKIP_BROWSER") == "1":
        pytest.skip("UNICTASK_SKIP_BROWSER=1")
    pytest.fail("headless Chromium is needed to check the HTML report: apt-get install -y chromium "
                "(or set UNICTASK_SKIP_BROWSER=1 to skip explicitly)")


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('data:image/png;base64,'));
  const out = document.createElement('pre');
  out.id = 'check';
  out.textContent = JSON.stringify({images: imgs.length, decoded: ok.length,
    sizes: ok.map(i => [i.naturalWidth, i.naturalHeight]), svgs: document.querySelectorAll('svg polyline').length,
    scatter: document.querySelectorAll('svg[aria-label^="Screen score"] circle').length,
    external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !u.startsWith('data:') && !u.startsWith('#'))});
  document.body.appendChild(out);
});
</script></body>"""


def chromium(args: list[str], tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium as the tests' user (root in CI needs --no-sandbox) with no network chatter."""
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_report_in_chromium(report: Path, tmp: Path, rows_by_step: dict[int, list[dict]],
                             screenshot: Path | None = None) -> dict:
    """Render ``report`` in headless Chromium; assert every image of the steps in ``rows_by_step`` decoded from its
    data URI, nothing external is referenced, the curves and the scatter of every recorded sample are drawn, and the
    samples' numbers and texts are on the page. Returns the check."""
    run = report.parent
    all_rows = {s: records.read_samples(run, s)[1] for s in records.list_steps(run)}
    page = tmp / "checked.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT, 1), encoding="utf-8")
    out = chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    m = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    import html

    check = json.loads(html.unescape(m.group(1)))
    n = sum(len(r) for r in rows_by_step.values())
    assert check["images"] == n and check["decoded"] == n, check
    assert check["external"] == [] and check["svgs"] >= 3, check
    screened = [r for rows in all_rows.values() for r in rows if r["screen_score"] is not None]
    assert check["scatter"] == len(screened), check   # screen score vs reward: one dot per screened sample
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    for step, rows in rows_by_step.items():
        assert f"step {step} ·" in text
        for r in rows:
            assert f"{r['reward']:.4f}" in text and f"{r['advantage']:+.4f}" in text
            assert display_text(r["answer"])[:40] in re.sub(r"\s+", " ", text)
    if screenshot is not None:
        shot = chromium(["--window-size=1280,1500", f"--screenshot={screenshot}", report.as_uri()], tmp)
        assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
        px = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.float64)
        assert px.std() > 20   # not blank
    return check


def test_report_renders_offline_in_headless_chromium(tmp_path):
    run = _fake_run(tmp_path, steps=3)
    report = build_report(run, image_steps=2, thumb=32)
    html_text = report.read_text()
    assert "http://" not in html_text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html_text
    shown = {1: records.read_samples(run, 1)[1], 3: records.read_samples(run, 3)[1]}   # 2 of 3 steps, ends kept
    check = check_report_in_chromium(report, tmp_path, shown, screenshot=tmp_path / "shot.png")
    assert all(max(w, h) == 32 for w, h in check["sizes"])   # thumbnails
    assert "step 2 ·" not in re.sub(r"<[^>]+>", " ", html_text) and "showing 2 of 3 recorded steps" in html_text
    rewards = [r["reward/total"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert all(f"{x:.4f}" in html_text for x in rewards)   # the step table's numbers


# -- a real tiny run ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_two_step_run_records_every_sample_and_inspect_shows_them(tmp_path, sample_root, make_shared_trainer):
    trainer = make_shared_trainer(tmp_path, sample_root, ["run.steps=2", "run.image_grid_every=0",
                                                          "run.prompts_per_step=2", "run.name=rec"])
    try:
        trainer.run()
        experts = list(trainer.cfg.serve.enabled)
        group = trainer.cfg.rollout.group_size
        screened = trainer.cfg.dsog.enabled
    finally:
        trainer.shutdown()
    run = trainer.run_dir
    assert records.list_steps(run) == [1, 2]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = BASE_COLUMNS[:BASE_COLUMNS.index("reward")] + [f"reward_{e}" for e in experts] + \
        BASE_COLUMNS[BASE_COLUMNS.index("reward"):]
    by_step = {}
    for step in (1, 2):
        _, rows = records.read_samples(run, step)
        by_step[step] = rows
        assert len(rows) == 2 * group and all(list(r) == expected for r in rows), list(rows[0])
        m = metrics[step - 1]
        assert m["step"] == step - 1 and {r["concept"] for r in rows} == set(m["concepts"].split(","))
        assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(m["reward/total"], abs=1e-6)
        for p in (0, 1):   # Dr.GRPO: advantages of a group sum to zero
            assert abs(sum(r["advantage"] for r in rows if r["prompt_index"] == p)) < 1e-5
        for r in rows:
            assert r["step"] == step and r["task"] in ("visual-instruct", "text-only")
            assert r["question"] and r["reference"] and r["compound_prompt"] and r["reward_text"]
            assert r["answer_tokens"] >= 1 and "<token_" not in r["reward_text"]
            assert r["reward_tier"] is not None and math.isfinite(r["reward"])
            if screened:
                assert len(r["attempt_scores"]) == r["attempts"] >= 1 and r["dsog"] in ("kept", "redrawn", "forced")
                assert r["screen_score"] in r["attempt_scores"]
            with Image.open(records.samples_dir(run) / r["image"]) as im:
                assert im.size[0] > 0 and im.mode == "RGB"
        if screened:
            att = [r["attempts"] for r in rows]
            assert sum(att) / len(att) == pytest.approx(m["dsog/attempts_per_sample"])
            assert sum(r["dsog"] == "forced" for r in rows) == m["dsog/forced_keeps"]
    # TensorBoard got the table as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [0, 1]
    out = _inspect(run, "--width", "200")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"step 2: {2 * group} samples of ")
    lines = out.stdout.splitlines()
    assert lines[1].startswith("group 0: ") and lines[2].startswith("group 1: ") and lines[3].startswith("p/s")
    table = lines[5:5 + 2 * group]
    assert lines[5 + 2 * group:] == [f"report: {run / REPORT_FILE}"]
    for line, r in zip(table, by_step[2]):
        assert line.startswith(f"{r['prompt_index']}/{r['sample_index']}") and f"{r['reward']:.4f}" in line
    check_report_in_chromium(run / REPORT_FILE, tmp_path, by_step)


@pytest.mark.slow
def test_engine_samples_carry_their_own_dsog_attempts_and_texts(tmp_path):
    """In-process rollout engine (no Ray): each sample's attempt scores, forced flag and kept score follow the DSOG
    rule at the threshold the group calibrated, and the records name its question and reward text."""
    import torch

    from actors.learner.step import concept_specs
    from actors.rollout.engine import GroupRequest, RolloutEngine
    from actors.rollout.scoring import local_scorer
    from backbone.build import build_policy
    from configs.schema import load_config
    from rl.data.reader import load_concept_dataset
    from rl.data.sample import write_sample_dataset

    root = tmp_path / "sample"
    write_sample_dataset(root, image_size=128, log=lambda *_: None)
    cfg = load_config("tiny_cpu", [f"data.root={root}", "rollout.group_size=4", "sampler.timesteps=6",
                                   "dsog.screen_step=2", "rollout.answer_max_new_tokens=6", "dsog.max_attempts=3"])
    ds = load_concept_dataset(root)
    torch.set_num_threads(1)
    engine = RolloutEngine(cfg, build_policy(cfg.model, concept_specs(ds)), ds, local_scorer(cfg, ds))
    res = engine.generate_group(GroupRequest(step=0, prompt_index=0, concept="chelsea", threshold=None))
    thr = res.init_threshold
    assert thr is not None
    for s in res.samples:
        assert len(s.attempt_scores) == s.attempts >= 1
        passed = [x > thr for x in s.attempt_scores]
        assert s.forced == (not any(passed))
        assert s.screen_score == (max(s.attempt_scores) if s.forced else s.attempt_scores[passed.index(True)])
        assert passed[:-1] == [False] * (s.attempts - 1)   # redrawn only while failing
    assert sum(s.forced for s in res.samples) == res.forced_keeps
    assert any(s.attempts > 1 for s in res.samples)   # the seeds of this group do redraw
    assert sorted(x for s in res.samples for x in s.attempt_scores) == sorted(res.attempt_scores)
    _, rows = records.write_samples(tmp_path / "run", 1, res.samples, experts=cfg.serve.enabled, threshold=thr)
    task = "visual-instruct" if res.samples[0].task_kind == "visual" else "text-only"
    for s, r in zip(res.samples, rows):
        assert r["question"] == s.question != "" and r["reward_text"] == s.reward_text != ""
        assert r["task"] == task and r["dsog"] == records.dsog_outcome(s) and r["input_image"] == s.input_image
