"""Judge inputs as released (issue 25): the evaluation sends the OpenAI-compatible judge exactly the request text the
released scripts build — Dense Gen. ``eval/4o_judge_t2i.py`` (the ``t2i_conditions`` prompt itself, never the
explicit prompt with the correct fact), Dense Rea. ``eval/eval_p_mmu.py`` (system prompt + question). The expected
texts are built below with the released scripts' own statements. Also: the set-up log names each concept's token
strings in the policy's order (sorted), whatever the order of concepts_list.json."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rl.eval.judge_openai import ANSWER_SYSTEM_PROMPT, IMAGE_SYSTEM_PROMPT, OpenAIJudge
from tests.test_judge_openai import FakeChatServer

CONCEPT = "astro"   # first by name, so its tokens are <token_i> as in the released scripts; t2i_conditions is a list


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from backbone.build import ConceptSpec, build_policy
    from launch.evaluate import load_cli_config
    from rl.data.reader import load_concept_dataset
    from rl.data.sample import write_sample_dataset

    torch.set_num_threads(1)
    root = write_sample_dataset(tmp_path_factory.mktemp("data") / "sample", image_size=64, log=lambda *_: None)
    cfg = load_cli_config("tiny_cpu", [f"data.root={root}", "sampler.timesteps=2", "dsog.screen_step=1",
                                       "eval.max_new_tokens=4", "eval.batch_size=4", "eval.images_per_prompt=1",
                                       f"run.output_root={tmp_path_factory.mktemp('runs')}"])
    ds = load_concept_dataset(root, include_test=True)
    policy = build_policy(cfg.model, [ConceptSpec(n, c.info.class_word) for n, c in ds.concepts.items()])
    return SimpleNamespace(root=root, cfg=cfg, ds=ds, policy=policy)


# ---- the released statements (eval/4o_judge_t2i.py, eval/eval_p_mmu.py), variables renamed only ------------------
def released_t2i_judge_prompts(data_root, concept) -> dict[str, str]:
    """4o_judge_t2i.py: condition -> the user prompt it sends."""
    with open(data_root / "concept/train" / concept / "info.json") as f:
        info = json.load(f)
    info_str = f"name: <{concept}>\n"
    info_str += f"info: {info['info']}" + "\n" + "extra_info: "
    for idx in range(len(info["extra_info"])):
        if idx != len(info["extra_info"]) - 1:
            info_str += info["extra_info"][idx] + " "
        else:
            info_str += info["extra_info"][idx] + "\n"
    with open(data_root / "concept/test" / concept / "t2i_conditions.json") as f:
        concept_test_conditions = json.load(f)
    out = {}
    for condition in concept_test_conditions:
        prompt = ("Concept Information:\n" + info_str + "\n" + "Generated image prompt:\n" + condition + "\n"
                  + "Please give a score according to the rules, no explanation needed.\n" + "Score:")
        out[condition] = prompt
    return out


def released_mmu_judge_prompt(concept, question_value, gt, pred, stage_1=16, stage_2=8, stage_3=0) -> str:
    """eval_p_mmu.py: the system prompt, the query, then ds_score_2_sentences' user prompt."""
    system_personalized_prompt = f"<{concept}> is "
    for i in range(stage_1):
        system_personalized_prompt += f"<token_{i}>"
    for i in range(stage_1 + stage_2, stage_1 + stage_2 + stage_3):
        system_personalized_prompt += f"<token_{i}>"
        if i == stage_1 + stage_2 + stage_3 - 1:
            system_personalized_prompt += ".\n"
    system_prompt = system_personalized_prompt
    query = system_prompt + question_value.replace("<image>\n", "")
    return f"Question: {query}, Answer: {gt}, Predicted answer: {pred}. Please give a score and don't make any other responses."  # noqa: E501


@pytest.mark.slow   # ~60 s on 2 shared cores (a tiny policy answers and draws)
def test_the_judge_gets_the_released_request_text_and_never_the_answer(env):
    from rl.eval.evaluate import EvalScorers, evaluate_policy

    with FakeChatServer([]) as srv:   # every request answered "1"
        judge = OpenAIJudge(base_url=srv.url, api_key_env=None)
        res = evaluate_policy(env.cfg, env.policy, env.ds, EvalScorers(judge=judge), limit=1, concepts=[CONCEPT])
    requests = [r["body"]["messages"] for r in srv.requests]
    image_reqs = [m[1]["content"][0]["text"] for m in requests if m[0]["content"] == IMAGE_SYSTEM_PROMPT]
    answer_reqs = [m[1]["content"][0]["text"] for m in requests if m[0]["content"] == ANSWER_SYSTEM_PROMPT]
    items = res["concepts"][CONCEPT]["items"]
    info = env.ds.concept(CONCEPT).info
    # Dense Gen.: the images of the held-out t2i_conditions prompts, each judged on the prompt as the file writes it
    released = released_t2i_judge_prompts(env.root, CONCEPT)
    judged = [g for g in items["generation"] if g.get("judge") is not None]
    assert judged and len(image_reqs) == len(judged)
    for g, text in zip(judged, image_reqs):
        assert g["judge_prompt"] in released and text == released[g["judge_prompt"]]
        prompt_part = text.split("Generated image prompt:\n", 1)[1]
        assert not any(fact in prompt_part for fact in info.extra_info)   # the fact to look for is not given
        assert g["clip_text"] not in text                                 # nor the explicit prompt
    # Dense Rea.: eval_p_mmu.py's query (system prompt + question), reference and the model's answer
    m = env.cfg.model
    expected = [released_mmu_judge_prompt(CONCEPT, it["prompt"], it["reference"], it["answer"],
                                          m.num_understanding_tokens, m.num_generation_tokens, m.num_stage3_tokens)
                for it in items["rea"]]
    assert items["rea"] and answer_reqs == expected
    assert res["concepts"][CONCEPT]["metrics"]["dense_gen"] == 1.0


def test_setup_log_names_the_tokens_in_the_policys_order(tmp_path):
    from actors.telemetry.setup_log import concept_checkpoint_lines
    from backbone.build import build_policy
    from backbone.config import ModelConfig

    m = ModelConfig.tiny()
    listed = ["zeta", "alpha"]                       # concepts_list.json order; the policy sorts by name
    policy = build_policy(m, listed)
    for name in listed:
        (tmp_path / name).mkdir()
        rows = 1 + len(policy.concepts[name].token_strs)   # <c> + its tokens
        for part, shape in (("embed", (rows, 8)), ("lm_head_weight", (rows, 8)), ("lm_head_bias", (rows,))):
            torch.save(torch.zeros(shape), tmp_path / name / f"epoch_1_{part}.pt")
    m.concept_checkpoint_dir, m.concept_checkpoint_epoch = str(tmp_path), 1
    lines = concept_checkpoint_lines(m, listed)
    assert [line.split(":")[0] for line in lines] == ["concept checkpoint for alpha", "concept checkpoint for zeta"]
    for line, name in zip(lines, ["alpha", "zeta"]):
        ct = policy.concepts[name]
        toks = [ct.concept_str, *ct.token_strs]
        assert f"tokens {' '.join(toks[:4])} ... {toks[-1]}" in line
    assert "<token_0>" in lines[0] and "<zeta_token_0>" in lines[1]
