"""The service against the released UniCTokens layout and code (issue 15): a dataset written as the released code
reads it (tests/released_layout.py, not our own writer), the released prompt strings rebuilt with the released
functions' logic, bad data refused before anything starts, and (slow) a training run + evaluation on it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rl.data.reader import DatasetError, check_training_use, load_concept_dataset
from rl.grpo.tasks import (
    ConceptPromptTokens,
    build_compound_prompt,
    build_understanding_prompt,
    reward_prompt,
    sample_task,
)

sys.path.insert(0, str(Path(__file__).parent))
from released_layout import CONCEPTS, write_prompts_to_eval, write_released_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_released_dataset(tmp_path_factory.mktemp("released") / "uni_c_tokens_data")


@pytest.fixture(scope="module")
def ds(root):
    return load_concept_dataset(root, include_test=True)


# ------------------------------------------------------------------------------------------ the released code's logic
# Written from sync_r1_grpo/grpo.py, sync_r1_grpo/utils.py and eval/eval_p_mmu.py (UniCTokens @9f7a80c), statement by
# statement, so the service's strings can be compared with what the released code builds on the same inputs.
def released_us_prompt_r(concept: str, info: dict, question: str) -> str:
    us_prompt=f'''
                            Below is some information about <{concept}> : {info['extra_info']}
                            Please make inferences based on the following prompt: {question}. 
                            If the prompt relates to a specific item from the aforementioned information list, 
                            output and only output that exact item. 
                            If the prompt does not relate to any item in the list, 
                            output nothing (i.e., an empty response).
                            '''  # noqa: E225,W291
    return 'USER: ' + us_prompt + ' ASSISTANT:'


def released_condition(mode: str, concept: str, info: dict, question: str, more_prompt: str,
                       n1: int = 16, n2: int = 8) -> str:
    new_tokens_stage_1 = [f"<token_{i}>" for i in range(n1)]
    new_tokens_stage_2 = [f"<token_{i}>" for i in range(n1, n1 + n2)]
    condition = 'A photo of '
    for token in new_tokens_stage_1:
        condition += token
    for token in new_tokens_stage_2:
        condition += token
    condition += f'<{concept}>.\n'
    if mode == 'r':
        separator = f"<{concept}>"
        parts = question.split(separator, 1)
        if len(parts) == 2:
            before = parts[0].strip()
            after = parts[1].strip()
        else:
            before = question
            after = ""
        condition = before + ' '
        for token in new_tokens_stage_1:
            condition += token
        for token in new_tokens_stage_2:
            condition += token
        condition = condition + f'<{concept}> ' + after + '.'
    cla = info['class']
    more_prompt = more_prompt.replace(f"{cla}", f"<{concept}>")
    if more_prompt:
        first_line = more_prompt.split('\n', 1)[0]
        end_punctuations = ('.', '!', '?')
        for punc in end_punctuations:
            end_idx = first_line.find(punc)
            if end_idx != -1:
                first_sentence = first_line[:end_idx + 1]
                break
        else:
            first_sentence = first_line
        more_prompt = first_sentence
    if '<|begin_of_box|>' in more_prompt:
        more_prompt = more_prompt.replace('<|begin_of_box|>', '')
    if '<|end_of_box|>' in more_prompt:
        more_prompt = more_prompt.replace('<|end_of_box|>', '')
    if 'empty' in more_prompt:
        more_prompt = ''
    condition += info['info'] + more_prompt
    return condition


def released_remove_token(raw_str: str) -> str:
    return re.sub(r"<token_\d+>", "", raw_str)


def released_system_prompt(concept: str, n1: int = 16, n2: int = 8, n3: int = 0) -> str:
    system_personalized_prompt = f"<{concept}> is "
    for i in range(n1):
        system_personalized_prompt += f"<token_{i}>"
    for i in range(n1 + n2, n1 + n2 + n3):
        system_personalized_prompt += f"<token_{i}>"
        if i == n1 + n2 + n3 - 1:
            system_personalized_prompt += ".\n"
    return system_personalized_prompt


ANSWERS = ["The man is sitting at a table. He smiles!", "Wow! A man in a hoodie.", "He is drinking coffee",
           "The man drinks a flat white.\nSecond line.", "empty", "The output is empty.",
           "The man rides a red bicycle? Maybe.", "woman with a violin.", ""]


@pytest.fixture(scope="module")
def tok_bo():
    from backbone.tokenizer import ShowoTokenizer

    tok = ShowoTokenizer.build_for_tests()
    return tok, ConceptPromptTokens.from_concept_tokens(tok.add_concept("bo", 24))


# ------------------------------------------------------------------------------------------ strings, byte for byte
def test_released_prompt_strings_byte_for_byte(ds, root, tok_bo):
    tok, tokens = tok_bo
    info = json.loads((root / "concept/train/bo/info.json").read_text())
    from backbone.prompts import MMU_TEMPLATE

    rng = np.random.default_rng(0)
    seen = {"text": 0, "visual": 0}
    for _ in range(12):
        task = sample_task(ds, "bo", rng, text_ratio=0.5, style="released")
        seen[task.kind] += 1
        question = build_understanding_prompt(task, tokens)
        if task.kind == "text":
            assert MMU_TEMPLATE.format(question) == released_us_prompt_r("bo", info, task.question)
        else:   # visual: the conversations.json query as is
            assert MMU_TEMPLATE.format(question) == "USER: " + task.question + " ASSISTANT:"
        mode = "r" if task.kind == "text" else "u"
        for answer in ANSWERS:
            cp, cut = build_compound_prompt(task, answer, tokens, tok, budget=10_000)
            want = released_condition(mode, "bo", info, task.question, answer)
            assert not cut and cp == want, (mode, answer)
            assert reward_prompt(cp, tokens, "man", style="released") == released_remove_token(want)
    assert seen["text"] and seen["visual"]
    assert tokens.released_system_prompt() == released_system_prompt("bo")
    s3 = ConceptPromptTokens.from_names("bo", num_stage3=8)
    assert s3.released_system_prompt() == released_system_prompt("bo", n3=8)


def test_released_style_is_the_default():
    from configs.schema import load_config

    assert load_config("tiny_cpu").data.prompt_style == "released"
    assert load_config("h100x8").data.prompt_style == "released"


# ------------------------------------------------------------------------------------------ the layout as shipped
def test_category_rule_references_masks_and_conversation_keys(ds, root):
    cats = {n: (c.info.category, c.info.category_source) for n, c in ds.concepts.items()}
    assert cats == {"bo": ("human", "conversation_type/class"), "mam": ("animal", "generation_type"),
                    "mug": ("object", "conversation_type")}
    for n, c in ds.concepts.items():
        assert all("mask" not in r.name for r in c.train.images + c.train.cropped)
        assert [r.name for r in c.train.references] == json.loads(
            (root / "concept/train/train_images.json").read_text())[n]
    mam = ds.concept("mam").train.conversations
    # grpo.py: the first key that is a substring of the image path: "0.png" ⊂ ".../10.png", "1.png" ⊂ ".../11.png"
    assert sorted(mam) == ["0.png", "1.png", "10.png", "11.png"]
    assert mam["10.png"][0].answer == "Green." and mam["11.png"][0].answer == "<mam> is resting."


def test_reasoning_split_pairs_as_grpo_py(ds, root):
    """Training prompts = the first int((n+1)*0.5) personalized-driven prompts, extra_info of the same index; held out:
    the rest, same pairing; the text tasks drawn are exactly those of grpo.py's randint(1, int((n+1)*rate))."""
    for name in CONCEPTS:
        c = ds.concept(name)
        raw = json.loads((root / "concept/test" / name / "t2i_conditions.json").read_text())
        pdg = raw if isinstance(raw, list) else raw["personalized_driven_generation"]
        n_train = int((len(pdg) + 1) * 0.5)
        assert [(r.prompt, r.answer_index) for r in c.train.reasoning] == [(pdg[i], i) for i in range(n_train)]
        assert [(r.prompt, r.answer_index) for r in c.test.held_out] == [
            (pdg[i], i) for i in range(n_train, min(len(pdg), len(c.info.extra_info)))]
        assert c.train.reasoning_source == "t2i_conditions"
        rng = np.random.default_rng(1)
        drawn = {sample_task(ds, name, rng, text_ratio=1.0).question for _ in range(40)}
        assert drawn == set(pdg[:n_train])
    check_training_use(ds, 1.0)
    check_training_use(ds, 0.0)


def test_test_data_items_resolve_foreign_paths(ds, root):
    items = ds.concept("bo").test.items
    assert [i.type for i in items] == ["rec", "rec", "rec", "vqa", "text_only", "choice"]
    assert items[0].image == (root / "concept/test/bo/0.png").resolve()
    assert items[2].image == (root / "random_images/0.png").resolve() and items[2].answer == "No."
    assert items[3].question == "What is <bo> doing?"    # "<image>\n" removed as eval_p_mmu.py does


def test_data_reader_settings_reach_every_loader(root, tmp_path):
    from configs.schema import load_config
    from rl.data.reader import load_dataset

    cfg = load_config("tiny_cpu", [f"data.root={root}", "data.reader.max_image_pixels=1000"])
    with pytest.raises(DatasetError, match="max_image_pixels"):
        load_dataset(cfg.data)


# ------------------------------------------------------------------------------------------ refused before anything
def _train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="")
    return subprocess.run([sys.executable, "-m", "launch.train", "--config", "tiny_cpu",
                           f"run.output_root={tmp_path / 'runs'}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("breakage,fragment", [
    ("info_not_object", "info.json: expected a JSON object"),
    ("concept_name", "'../x' is not allowed"),
    ("no_reference", "train_images.json"),
    ("empty_extra_info", "'extra_info' is empty"),
])
def test_train_refuses_bad_data_before_ray_and_run_folder(root, tmp_path, breakage, fragment):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    if breakage == "info_not_object":
        (data / "concept/train/mam/info.json").write_text("[1, 2]")
    elif breakage == "concept_name":
        (data / "concepts_list.json").write_text(json.dumps(["bo", "../x"]))
    elif breakage == "no_reference":
        (data / "concept/train/train_images.json").write_text(json.dumps({"bo": [], "mam": ["0.png"],
                                                                           "mug": ["0.png"]}))
    else:
        p = data / "concept/train/mug/info.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "extra_info": []}))
    before = sorted(str(p) for p in data.rglob("*"))
    r = _train([f"data.root={data}", "data.text_task_ratio=1.0"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()             # no run folder
    assert "local Ray cluster" not in r.stderr          # Ray never started
    assert sorted(str(p) for p in data.rglob("*")) == before


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_train_text_tasks_then_evaluate_on_the_released_layout(root, tmp_path):
    """The tiny config trains on the released layout with text-only tasks only, then launch.evaluate reads
    test_data/<c>.json and the code-side prompts_to_eval.json."""
    data = tmp_path / "uni_c_tokens_data"
    shutil.copytree(root, data)
    r = _train([f"data.root={data}", "data.text_task_ratio=1.0", "run.steps=2", "run.name=released",
                "rollout.group_size=3", "sampler.timesteps=6", "dsog.screen_step=2", "rollout.answer_max_new_tokens=8",
                "data.concepts=[bo,mug]"], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "runs/released/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    prompts = write_prompts_to_eval(tmp_path / "code")
    out = tmp_path / "eval"
    ev = subprocess.run([sys.executable, "-m", "launch.evaluate", "--checkpoint", str(tmp_path / "runs/released/final"),
                         "--out", str(out), "--limit", "2", f"eval.prompts_to_eval={prompts}", "eval.max_new_tokens=4",
                         "sampler.timesteps=2", "dsog.screen_step=1"], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
    assert ev.returncode == 0, ev.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["concepts"]) == {"bo", "mug"} and res["settings"]["prompts_to_eval"] == str(prompts)
    bo = res["concepts"]["bo"]
    assert [g["prompt"].split("<bo>")[-1] for g in bo["items"]["generation"] if g["kind"] == "pure"] == [
        " on the beach", " wearing a red hat"]                   # DreamBench live_subject list, capped at 2
    assert bo["counts"]["rec_pos"] == 2 and bo["counts"]["vqa"] == 1 and bo["counts"]["qa"] == 1
    assert [x["prompt"] for x in bo["items"]["rea"]] == ["A photo of <bo> on the way to work",
                                                          "A photo of <bo> with his sleeves rolled up"]
