"""Bring your own concept (issue 27): ``python -m launch.new_concept`` from a folder of photos to the released layout.

Concepts built from scikit-image photos (views of one shot: crops, zooms, mirrors) with the offline templates load in
our reader and in a reader written from the released code's statements; bad photo folders are refused with one line
and the data root unchanged (hashed before / after); the VLM path runs against a chat-completions server started
here on loopback (good replies, a malformed reply, a 500 then success); (slow) the printed hand-off lines inject,
train 2 tiny GRPO steps with data.text_task_ratio=0.5 and evaluate."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.new_concept import handoff, main
from rl.data.layout import skimage_photo
from rl.data.new_concept import ConceptError, NewConceptRequest, build_new_concept
from rl.data.photos import PhotoLimits, dhash, hamming
from rl.data.reader import check_training_use, load_concept_dataset

sys.path.insert(0, str(Path(__file__).parent))
from test_released_layout import released_condition, released_us_prompt_r  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACTS = ["<c> sleeps in a wicker basket next to the fireplace.", "She plays with a blue ball of yarn.",
         "<c> eats salmon from a green ceramic bowl.", "<c> visited a snowy mountain cabin last winter.",
         "<c> wears a red collar with a small bell."]
_VIEWS = [(1.0, .5, .5, 0), (0.8, .4, .4, 0), (0.8, .6, .6, 1), (0.7, .45, .6, 0), (0.9, .55, .45, 1),
          (0.75, .5, .5, 0), (0.85, .4, .6, 1)]


def views(name: str, n: int, size: int = 320) -> list[np.ndarray]:
    """``n`` different views (crop, zoom, mirror) of one scikit-image photo at ``size`` px; the astronaut is cut to
    head and shoulders so MTCNN finds the face."""
    a = skimage_photo(name)
    if name == "astronaut":
        a = a[:360, 60:420]
    h, w = a.shape[:2]
    out = []
    for frac, cy, cx, flip in _VIEWS[:n]:
        s = int(min(h, w) * frac)
        y0, x0 = int(min(max(cy * h - s / 2, 0), h - s)), int(min(max(cx * w - s / 2, 0), w - s))
        im = Image.fromarray(a[y0:y0 + s, x0:x0 + s]).resize((size, size))
        out.append(np.asarray(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im))
    return out


def photo_dir(path: Path, name: str, n: int) -> Path:
    path.mkdir(parents=True)
    for i, v in enumerate(views(name, n)):
        Image.fromarray(v).save(path / f"IMG_{i:03d}.jpg", quality=92)
    return path


def digest(root: Path) -> str:
    """SHA-256 of every file's relative path and bytes under ``root`` (empty folders too)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------ built once
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A new data root with an animal (chelsea, 5 facts naming it as <c>, <chelsea> or "She") and a human (astro,
    no facts), offline templates."""
    tmp = tmp_path_factory.mktemp("new_concept")
    facts = tmp / "facts.txt"
    facts.write_text("# chelsea\n" + "\n".join(FACTS) + "\n\n")
    root = tmp / "data"
    cat = build_new_concept(NewConceptRequest(
        photo_dir(tmp / "cat", "chelsea", 7), "chelsea", "cat", root, category="animal",
        profile="a tabby cat with green eyes", facts=[f.replace("<c> eats", "<chelsea> eats") for f in FACTS],
        limits=PhotoLimits(min_side=200)), log=lambda *_: None)
    human = build_new_concept(NewConceptRequest(
        photo_dir(tmp / "astro", "astronaut", 6), "astro", "woman", root, limits=PhotoLimits(min_side=200)),
        log=lambda *_: None)
    return {"root": root, "cat": cat, "human": human, "tmp": tmp}


def test_offline_concept_loads_in_our_reader(built):
    root = built["root"]
    ds = load_concept_dataset(root, include_test=True)
    assert list(ds.concepts) == ["chelsea", "astro"]
    c = ds.concept("chelsea")
    assert (c.info.category, c.info.category_source, c.info.class_word) == ("animal", "category", "cat")
    assert c.info.info == "<chelsea> is a tabby cat with green eyes."
    assert c.info.extra_info[1] == "<chelsea> plays with a blue ball of yarn."          # "She" -> <chelsea>
    assert len(c.train.images) == 5 and len(c.train.cropped) == 5 and len(c.test.images) == 2
    assert sorted(c.train.conversations) == [f"{i}.png" for i in range(5)]
    # one reasoning prompt per fact; the first int((5+1)/2) = 3 train, index-paired with extra_info; 2 held out
    assert [(r.prompt, r.answer_index) for r in c.train.reasoning] == [
        ("A photo of <chelsea> taking a nap", 0), ("A photo of <chelsea> enjoying its favourite pastime", 1),
        ("A photo of <chelsea> at meal time", 2)]
    assert [r.answer_index for r in c.test.held_out] == [3, 4]
    assert {it.type for it in c.test.items} == {"rec", "vqa", "text_only"}
    assert [it.answer for it in c.test.items if it.type == "rec"] == ["Yes.", "Yes."] + ["No."] * 4
    a = ds.concept("astro")
    assert (a.info.category, a.info.info, a.info.extra_info) == ("human", "<astro> is a woman.", [])
    assert [r.name for r in a.train.references] == [f"{i}.png" for i in range(4)]   # every one shows a face
    assert all(im.load().shape == (512, 512, 3) for im in a.train.cropped)
    check_training_use(load_concept_dataset(root, ["chelsea"]), 0.5)
    with pytest.raises(ValueError, match="extra_info' is empty"):     # astro has no facts: visual tasks only
        check_training_use(load_concept_dataset(root, ["astro"]), 0.5)
    check_training_use(load_concept_dataset(root, ["astro"]), 0.0)


def released_read(root: Path, concept: str) -> dict:
    """The concept as the released code reads it, statement by statement (sync_r1_grpo/grpo.py, utils.py, pdata.py,
    eval/eval_p_mmu.py): json.load of each file and the fields the released code indexes."""
    def read_json_to_dict(p):
        with open(p, "r") as f:
            return json.load(f)
    info = read_json_to_dict(os.path.join(root, "concept/train", concept, "info.json"))
    t2i = read_json_to_dict(os.path.join(root, "concept/test", concept, "t2i_conditions.json"))
    vqa = read_json_to_dict(os.path.join(root, "concept/train", concept, "conversations.json"))
    class_concept, conversation_type = info["class"], info["conversation_type"]          # pdata.get_concept_info
    concept_info = info["info"].replace(f"<{concept}> is ", "").strip()
    path = os.path.join(root, "concept/train", concept)
    image_files = sorted((int(Path(f).stem), os.path.join(path, f)) for f in os.listdir(path)    # get_image_path
                         if Path(f).suffix.lower() in {".jpg", ".jpeg", ".png"} and Path(f).stem.isdigit())
    picked = {}
    for _, img in image_files:                                          # grpo.py: first key that is a substring
        for k in vqa.keys():
            if k in img:
                picked[img] = (vqa[k][0]["query"], vqa[k][0]["answer"])
                break
    train_images = read_json_to_dict(os.path.join(root, "concept/train", "train_images.json"))
    refs = [os.path.join(path, img) for img in train_images[concept]]
    crops = [f for f in sorted(os.listdir(os.path.join(path, "cropped")))
             if f.lower().endswith(("png", "jpg", "jpeg")) and "mask" not in f]
    tests = read_json_to_dict(os.path.join(root, "test_data", f"{concept}.json"))
    items = [(it["type"], os.path.join(root, it["image"]), it["conversations"][0]["value"].replace("<image>\n", ""),
              it["conversations"][1]["value"]) for it in tests]
    return {"info": info, "class": class_concept, "type": conversation_type, "profile": concept_info,
            "pdg": t2i["personalized_driven_generation"], "images": image_files, "picked": picked, "refs": refs,
            "crops": crops, "items": items}


def test_offline_concept_loads_as_the_released_code_reads_it(built):
    from backbone.tokenizer import ShowoTokenizer
    from rl.data.reader import load_concept_dataset
    from rl.grpo.tasks import ConceptPromptTokens, build_compound_prompt, build_understanding_prompt, sample_task

    root = built["root"]
    r = released_read(root, "chelsea")
    assert (r["class"], r["type"], r["profile"]) == ("cat", "animal", "a tabby cat with green eyes.")
    assert len(r["images"]) == 5 and len(r["picked"]) == 5 and len(r["crops"]) == 5
    assert all(Path(p).is_file() for p in r["refs"]) and all(Path(i[1]).is_file() for i in r["items"])
    assert len(r["pdg"]) == len(r["info"]["extra_info"]) == 5
    assert all(p.startswith("A photo of <chelsea> ") and not p.endswith(".") for p in r["pdg"])
    for fact, prompt in zip(r["info"]["extra_info"], r["pdg"]):      # the prompt asks for the fact, never states it
        assert fact.removeprefix("<chelsea> ").rstrip(".").lower() not in prompt.lower()
    h = released_read(root, "astro")
    assert h["type"] == "human" and "man" in h["class"] and len(h["refs"]) == 4
    # the service builds the released strings on these files
    ds = load_concept_dataset(root, ["chelsea"])
    tok = ShowoTokenizer.build_for_tests()
    tokens = ConceptPromptTokens.from_concept_tokens(tok.add_concept("chelsea", 24))
    from backbone.prompts import MMU_TEMPLATE

    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(16):
        task = sample_task(ds, "chelsea", rng, text_ratio=0.5, style="released")
        kinds.add(task.kind)
        if task.kind == "text":
            assert MMU_TEMPLATE.format(build_understanding_prompt(task, tokens)) == released_us_prompt_r(
                "chelsea", r["info"], task.question)
            assert task.question in r["pdg"][:3]
        cp, _ = build_compound_prompt(task, "The cat sleeps in a basket.", tokens, tok, budget=10_000)
        assert cp == released_condition("r" if task.kind == "text" else "u", "chelsea", r["info"], task.question,
                                        "The cat sleeps in a basket.")
    assert kinds == {"text", "visual"}


def test_handoff_lines_pass_the_pre_ray_validation(built, tmp_path):
    """The printed train line's config, as launch.train builds it, passes launch.train.prepare unchanged."""
    from configs.schema import load_config
    from launch.train import prepare

    for name, facts in (("chelsea", True), ("astro", False)):
        cmds = handoff(built["root"], name, "tiny", str(tmp_path / "runs"), facts, 0.5)
        argv = shlex.split(cmds["train"])
        run = Path(cmds["train_run"])
        assert f"run.name=inject-{name}" in cmds["inject"] and f"run.name={run.name}" in argv
        assert run.parent == tmp_path / "runs" and run.name != f"inject-{name}"
        assert cmds["evaluate"].startswith(f"python -m launch.evaluate --checkpoint {run}/final")
        assert argv[:5] == ["python", "-m", "launch.train", "--config", "configs/tiny_cpu.yaml"]
        assert f"model.concept_checkpoint_dir={tmp_path / 'runs'}/inject-{name}/concepts/stage3" in argv
        assert ("data.text_task_ratio=0.5" if facts else "data.text_task_ratio=0") in argv
        cfg = load_config(str(REPO / argv[4]), argv[5:])
        ds = prepare(cfg)                                  # every file, every image, FER's face check for astro
        assert list(ds.concepts) == [name] and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def existing_root(built, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(built["root"], root)
    return root


def _refused(capsys, args, root, fragment):
    before = digest(root)
    rc, _, err = run_cli(args + ["--data-root", str(root), "--min-side", "200"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err and digest(root) == before
    return lines[0]


def test_refuses_an_empty_folder(tmp_path, existing_root, capsys):
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["--photos", str(tmp_path / "empty"), "--name", "rex", "--class", "dog", "--category", "animal"],
             existing_root, "0 usable photo(s), 5 needed (--min-photos); no files")


def test_refuses_all_near_duplicates(tmp_path, existing_root, capsys):
    d = tmp_path / "dups"
    d.mkdir()
    base = Image.fromarray(views("coffee", 1)[0])
    for i, (side, q) in enumerate([(320, 95), (300, 80), (400, 70), (256, 90), (360, 60), (320, 40)]):
        base.resize((side, side)).save(d / f"{i}.jpg", quality=q)   # re-encodes and resizes of one shot
    line = _refused(capsys, ["--photos", str(d), "--name", "mug", "--class", "mug", "--category", "object"],
                    existing_root, "1 usable photo(s), 5 needed")
    assert line.count("near-duplicate of 0.jpg") == 5


def test_refuses_a_truncated_image(tmp_path, existing_root, capsys):
    d = photo_dir(tmp_path / "trunc", "coffee", 5)
    data = (d / "IMG_002.jpg").read_bytes()
    (d / "IMG_002.jpg").write_bytes(data[:len(data) // 2])
    (d / "notes.txt").write_text("not a photo")
    line = _refused(capsys, ["--photos", str(d), "--name", "mug", "--class", "mug", "--category", "object"],
                    existing_root, "4 usable photo(s), 5 needed")
    assert "IMG_002.jpg (cannot decode" in line and "notes.txt (not an image file" in line


def test_refuses_a_human_without_a_face(tmp_path, existing_root, capsys):
    d = photo_dir(tmp_path / "noface", "coffee", 6)
    _refused(capsys, ["--photos", str(d), "--name", "gran", "--class", "woman"], existing_root,
             "MTCNN finds a face (probability >= 0.9) in 0 of 6 usable photos of this human concept, 3 needed")


def test_refuses_existing_names_unsafe_names_and_bad_facts(built, tmp_path, existing_root, capsys):
    cat = str(built["tmp"] / "cat")
    base = ["--photos", cat, "--class", "cat", "--category", "animal"]
    _refused(capsys, base + ["--name", "chelsea"], existing_root, "concept 'chelsea' already exists")
    _refused(capsys, base + ["--name", "../x"], existing_root, "concept name '../x' is not allowed")
    bad = tmp_path / "facts.txt"
    bad.write_text("<c> likes fish.\nLikes naps.\n")
    _refused(capsys, base + ["--name", "kitty", "--facts", str(bad)], existing_root,
             f"--facts {bad}: fact 2 'Likes naps.' must name the concept")
    _refused(capsys, ["--photos", cat, "--class", "cat", "--name", "kitty"], existing_root, "--category is needed")


def test_force_replaces_a_concept_and_keeps_the_others(built, existing_root, capsys):
    before = {n: digest(existing_root / "concept" / "train" / n) for n in ("astro",)}
    rc, out, err = run_cli(["--photos", str(built["tmp"] / "cat"), "--name", "chelsea", "--class", "cat",
                            "--category", "animal", "--data-root", str(existing_root), "--min-side", "200",
                            "--test-photos", "1", "--force", "--preset", "tiny"], capsys)
    assert rc == 0, err
    ds = load_concept_dataset(existing_root, include_test=True)
    assert list(ds.concepts) == ["chelsea", "astro"] and len(ds.concept("chelsea").train.images) == 6
    assert ds.concept("chelsea").info.extra_info == [] and digest(existing_root / "concept/train/astro") == \
        before["astro"]
    assert "data.text_task_ratio=0" in out and not list(existing_root.glob(".new_concept-*"))


# ------------------------------------------------------------------------------------------ the VLM path
class _ChatServer:
    """A chat-completions server on 127.0.0.1: answers per request kind; ``script`` lists (status, reply) overrides
    for the first requests; ``malformed`` makes every photo reply invalid."""

    def __init__(self, script=(), malformed=False):
        self.requests, self.script, self.malformed = [], list(script), malformed
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                status, text = outer.script.pop(0) if outer.script else (200, outer.answer(body))
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                     if status == 200 else {"error": "boom"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body) -> str:
        tok = re.search(r"called (<[^>]+>)", body["messages"][0]["content"]).group(1)
        text = body["messages"][1]["content"][0]["text"]
        if '{"info"' in text:
            return json.dumps({"info": f"{tok} is a tabby cat sitting on a wooden floor."})
        if '{"prompts"' in text:
            n = int(re.search(r"exactly (\d+) prompts", text).group(1))
            prompts = [f"A photo of {tok} in scene {i}." for i in range(n)]
            return "```json\n" + json.dumps({"prompts": prompts}) + "\n```"
        if self.malformed:
            return "Sure! The cat looks relaxed."
        k = len(self.requests)
        return json.dumps({"caption": f"A photo of {tok} lying by a window ({k}).",
                           "qa": [{"query": f"Where is {tok}?", "answer": f"By a window ({k})."},
                                  {"query": f"What colour is {tok}?", "answer": "Brown and grey."}]})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_vlm_writes_grounded_text_through_a_500_and_a_malformed_reply(built, tmp_path, monkeypatch):
    from rl.data.concept_vlm import VLMTextWriter

    monkeypatch.setenv("TEST_VLM_KEY", "sk-test")
    server = _ChatServer(script=[(500, ""), (200, "not json at all")])
    try:
        writer = VLMTextWriter(server.url, model="tiny-vlm", api_key_env="TEST_VLM_KEY", max_retries=2,
                               schema_retries=1, retry_backoff_s=0.01, log=lambda *_: None)
        res = build_new_concept(NewConceptRequest(built["tmp"] / "cat", "kitty", "cat", tmp_path / "data",
                                                  category="animal", facts=FACTS[:3],
                                                  limits=PhotoLimits(min_side=200)), writer=writer,
                                log=lambda *_: None)
    finally:
        server.close()
    assert res.text_source == f"vlm tiny-vlm at {server.url}"
    paths = {p for p, _, _ in server.requests}
    assert paths == {"/v1/chat/completions"}
    # 1 (500) + profile (invalid, then valid) + 5 training + 2 test photos + reasoning prompts
    assert len(server.requests) == 1 + 2 + 5 + 2 + 1
    assert all(h["Authorization"] == "Bearer sk-test" for _, h, _ in server.requests)
    images = [c["image_url"]["url"] for _, _, b in server.requests for c in b["messages"][1]["content"]
              if c["type"] == "image_url"]
    assert images and all(u.startswith("data:image/jpeg;base64,") for u in images)
    assert Image.open(io.BytesIO(base64.b64decode(images[-1].split(",", 1)[1]))).size == (320, 320)
    ds = load_concept_dataset(tmp_path / "data", include_test=True)
    c = ds.concept("kitty")
    assert c.info.info == "<kitty> is a tabby cat sitting on a wooden floor."
    assert [r.prompt for r in c.train.reasoning] == ["A photo of <kitty> in scene 0", "A photo of <kitty> in scene 1"]
    assert all(qa.query in ("Where is <kitty>?", "What colour is <kitty>?") for v in c.train.conversations.values()
               for qa in v)
    caps = json.loads((tmp_path / "data/concept/train/kitty/captions.json").read_text())
    assert len(set(caps.values())) == 5 and all("lying by a window" in v for v in caps.values())
    assert c.test.vqa and all(qa.query in ("Where is <kitty>?", "What colour is <kitty>?") for qa in c.test.vqa)


def test_vlm_malformed_replies_are_refused_with_nothing_written(built, tmp_path, capsys):
    server = _ChatServer(malformed=True)
    root = tmp_path / "data"
    try:
        rc, _, err = run_cli(["--photos", str(built["tmp"] / "cat"), "--name", "kitty", "--class", "cat",
                              "--category", "animal", "--profile", "a cat", "--data-root", str(root),
                              "--min-side", "200", "--vlm", server.url, "--vlm-key-env", "",
                              "--vlm-schema-retries", "1"], capsys)
    finally:
        server.close()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--vlm: photo 0.png:" in lines[0] and "sent 2 invalid replies" in lines[0]
    assert "not JSON" in lines[0] and not root.exists() and len(server.requests) == 2


def test_dhash_separates_views_and_joins_reencodes():
    v = views("chelsea", 7)
    hs = [dhash(x) for x in v]
    assert min(hamming(hs[i], hs[j]) for i in range(7) for j in range(i)) > 10
    buf = io.BytesIO()
    Image.fromarray(v[0]).resize((250, 250)).save(buf, "JPEG", quality=60)
    assert hamming(hs[0], dhash(np.asarray(Image.open(buf).convert("RGB")))) <= 3
    with pytest.raises(ConceptError, match="--min-photos"):
        build_new_concept(NewConceptRequest(Path("."), "x", "cat", Path("/nonexistent-root-x"), category="animal",
                                            limits=PhotoLimits(min_photos=2, test_photos=2)), log=lambda *_: None)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_printed_lines_inject_train_two_steps_and_evaluate(built, tmp_path, capsys):
    """The hand-off as printed: inject (tiny), train 2 GRPO steps with text_task_ratio 0.5 on the injected rows,
    evaluate the result."""
    root = tmp_path / "data"
    rc, out, err = run_cli(["--photos", str(built["tmp"] / "cat"), "--name", "kitty", "--class", "cat",
                            "--category", "animal", "--facts", str(built["tmp"] / "facts.txt"), "--data-root",
                            str(root), "--min-side", "200", "--preset", "tiny", "--runs-root",
                            str(tmp_path / "runs")], capsys)
    assert rc == 0, err
    lines = {k: v for k, v in (ln.split(":", 1) for ln in out.splitlines() if ln.split(":")[0] in
                                 ("inject", "train", "evaluate"))}
    run_dir = Path(re.search(r"--checkpoint (\S+)/final", lines["evaluate"]).group(1))
    assert run_dir.parent == tmp_path / "runs" and f"run.name={run_dir.name}" in lines["train"]
    env = dict(os.environ, RAY_ADDRESS="")

    def run(line: str, extra: list[str], timeout: int) -> subprocess.CompletedProcess:
        argv = shlex.split(line.strip())
        assert argv[:2] == ["python", "-m"]
        r = subprocess.run([sys.executable, *argv[1:], *extra], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout, check=False)
        assert r.returncode == 0, r.stderr[-4000:]
        return r

    run(lines["inject"], [], 400)
    t = run(lines["train"], ["run.steps=2", "rollout.group_size=3", "sampler.timesteps=6", "dsog.screen_step=2",
                             "rollout.answer_max_new_tokens=8"], 500)
    assert "concept checkpoint for kitty:" in t.stderr and "epoch 4" in t.stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    run(lines["evaluate"], ["--limit", "2", "eval.max_new_tokens=4", "sampler.timesteps=2", "dsog.screen_step=1"],
        600)
    res = json.loads((run_dir / "eval/results.json").read_text())
    kitty = res["concepts"]["kitty"]
    assert kitty["counts"]["rec_pos"] == 2 and kitty["counts"]["vqa"] >= 1
    assert [x["prompt"] for x in kitty["items"]["rea"]] == ["A photo of <kitty> on its last outing",
                                                             "A photo of <kitty> dressed for the occasion"]
