"""A concept dataset written the way the RELEASED UniCTokens code reads it (arctanxarc/UniCTokens @9f7a80c), for tests.

Independent of the service's own writer (``rl.data.sample``): it follows the files the released code opens,

* ``sync_r1_grpo/grpo.py``: ``concept/train/<c>/info.json`` (``class``, ``info``, ``extra_info`` list — no
  ``category``), ``concept/test/<c>/t2i_conditions.json["personalized_driven_generation"]``,
  ``concept/train/<c>/conversations.json`` (keys matched by substring of the chosen image path), ``black_512x512.png``;
* ``sync_r1_grpo/utils.py::get_image_path``: training photos with digit stems (``0.png``, ``3.jpg``);
* ``sync_r1_grpo/clip_eval.py`` / ``pdata.py``: ``concept/train/train_images.json``, ``cropped/`` with ``*mask*`` files;
* ``eval/eval_p_mmu.py``: ``test_data/<c>.json`` items with ``image`` paths as written on the machine that made them;
* ``eval/gen_p_images_for_mmu_t2i.py``: the list form of ``t2i_conditions.json``;
* ``prompts_to_eval.json`` kept beside the code (here: a separate folder), not in the data.

Concepts: ``bo`` (a man: human by ``'man' in class``; JPEG photos; dict-form t2i_conditions), ``mam`` (a cat:
``conversation_type`` absent, ``generation_type`` live_subject → animal; list-form t2i_conditions; a conversations key
"1.png" that also matches "11.png" and comes first), ``mug`` (an object, ``conversation_type`` "object").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

DREAMBENCH = {   # a short stand-in of the released prompts_to_eval.json (same structure, "<sks>" placeholder)
    "object": ["a <sks> in the jungle", "a <sks> in the snow", "a red <sks>"],
    "live_subject": ["a <sks> on the beach", "a <sks> wearing a red hat", "a wet <sks>"],
}

_CONCEPTS = {
    "bo": {
        "photo": "astronaut", "ext": ".jpg", "n_train": 3, "t2i": "dict",
        "info": {"class": "man", "conversation_type": "human", "generation_type": "live_subject",
                 "info": "<bo> is a man with short dark hair who wears a grey hoodie.",
                 "extra_info": ["<bo> drinks a flat white every morning.", "<bo> plays the violin on Sundays.",
                                "<bo> wears round glasses when he reads.", "<bo> rides a red bicycle to work.",
                                "<bo> has a tattoo of a compass on his arm."]},
        "pdg": ["A photo of <bo> having breakfast", "A photo of <bo> on a Sunday afternoon",
                "A photo of <bo> reading a book", "A photo of <bo> on the way to work",
                "A photo of <bo> with his sleeves rolled up"],
    },
    "mam": {
        "photo": "chelsea", "ext": ".png", "n_train": 12, "t2i": "list",
        "info": {"class": "cat", "generation_type": "live_subject",
                 "info": "<mam> is a tabby cat with green eyes.",
                 "extra_info": ["<mam> sleeps on a blue cushion.", "<mam> chases a toy mouse.",
                                "<mam> wears a yellow collar.", "<mam> sits on the windowsill at dusk."]},
        "pdg": ["A photo of <mam> taking a nap", "A photo of <mam> playing", "A photo of <mam> dressed up",
                "A photo of <mam> at sunset"],
    },
    "mug": {
        "photo": "coffee", "ext": ".png", "n_train": 3, "t2i": "dict",
        "info": {"class": "mug", "conversation_type": "object", "generation_type": "object",
                 "info": "<mug> is a red espresso cup on a saucer.",
                 "extra_info": ["<mug> stands on an oak shelf.", "<mug> is used for hot chocolate in winter.",
                                "<mug> came from a market in Lisbon."]},
        "pdg": ["A photo of <mug> at home", "A photo of <mug> on a cold evening", "A photo of <mug> with its origin"],
    },
}
CONCEPTS = tuple(_CONCEPTS)


def _photo(name: str, size: int, k: int) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    if name == "astronaut":   # head and shoulders, so a face detector finds the face at small sizes
        a = a[:300, 90:390]
    h, w = a.shape[:2]
    s = int(min(h, w) * (1.0 - 0.04 * (k % 5)))
    y, x = (h - s) // 2, (w - s) // 2 + (k % 3)
    return Image.fromarray(np.ascontiguousarray(a[y:y + s, x:x + s])).resize((size, size))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False), encoding="utf-8")


def write_released_dataset(root: Path, size: int = 128, foreign_root: str = "/mnt/data/uni_c_tokens_data") -> Path:
    """Write the dataset under ``root``; ``test_data`` image paths are written under ``foreign_root`` (the machine
    that ran gen_test_data.py), as the released files are."""
    root = Path(root)
    (root / "concept" / "train").mkdir(parents=True, exist_ok=True)
    _json(root / "concepts_list.json", list(CONCEPTS))
    Image.new("RGB", (512, 512)).save(root / "black_512x512.png")
    (root / "random_images").mkdir()
    for i, name in enumerate(("camera", "rocket")):
        _photo(name, size, i).save(root / "random_images" / f"{i}.png")
    train_images = {}
    for c, spec in _CONCEPTS.items():
        tr, te = root / "concept" / "train" / c, root / "concept" / "test" / c
        (tr / "cropped").mkdir(parents=True)
        names = [f"{i}{spec['ext']}" for i in range(spec["n_train"])]
        for k, n in enumerate(names):
            _photo(spec["photo"], size, k).save(tr / n)
            _photo(spec["photo"], size, k).save(tr / "cropped" / n)
            Image.new("L", (size, size), 255).save(tr / "cropped" / f"{k}_mask.png")
        Image.new("L", (size, size), 255).save(tr / "0_mask.png")   # pdata.py skips "mask" files
        train_images[c] = names[:2]
        _json(tr / "info.json", spec["info"])
        if c == "mam":   # "1.png" comes first and is a substring of ".../11.png" too: grpo.py picks it for both
            conv = {"1.png": [{"query": "What is <mam> doing?", "answer": "<mam> is resting."}],
                    "0.png": [{"query": "What colour are <mam>'s eyes?", "answer": "Green."}],
                    "11.png": [{"query": "Never used?", "answer": "Shadowed by 1.png."}],
                    "99.png": [{"query": "No such image.", "answer": "Unused."}]}
        else:
            conv = {n: [{"query": f"What is <{c}> doing in this photo?", "answer": f"<{c}> is posing."},
                        {"query": f"Describe <{c}>.", "answer": spec["info"]["info"]}] for n in names}
        _json(tr / "conversations.json", conv)
        te.mkdir(parents=True)
        for k in range(2):
            _photo(spec["photo"], size, 7 + k).save(te / f"{k}.png")
        _json(te / "t2i_conditions.json", spec["pdg"] if spec["t2i"] == "list"
              else {"personalized_driven_generation": spec["pdg"]})
        human = lambda q: {"from": "human", "value": f"<image>\n{q}"}   # noqa: E731
        gpt = lambda a: {"from": "gpt", "value": a}   # noqa: E731
        items = [{"image": f"{foreign_root}/concept/test/{c}/{k}.png", "type": "rec",
                  "conversations": [human(f"Is <{c}> in this image?"), gpt("Yes.")]} for k in range(2)]
        items += [{"image": f"{foreign_root}/random_images/0.png", "type": "rec",
                   "conversations": [human(f"Is <{c}> in this image?"), gpt("No.")]},
                  {"image": f"{foreign_root}/concept/test/{c}/0.png", "type": "vqa",
                   "conversations": [human(f"What is <{c}> doing?"), gpt(f"<{c}> is posing for the camera.")]},
                  {"image": f"{foreign_root}/black_512x512.png", "type": "text_only",
                   "conversations": [human(f"What do you know about <{c}>?"), gpt(spec["info"]["info"])]},
                  {"image": f"{foreign_root}/concept/test/{c}/1.png", "type": "choice",
                   "conversations": [human(f"Is this <{c}>? A. yes B. no"), gpt("A")]}]
        _json(root / "test_data" / f"{c}.json", items)
    _json(root / "concept" / "train" / "train_images.json", train_images)
    return root


def write_prompts_to_eval(folder: Path) -> Path:
    """The DreamBench prompt file, beside 'the code' (not in the data), as the released repository keeps it."""
    path = Path(folder) / "prompts_to_eval.json"
    _json(path, DREAMBENCH)
    return path
