"""A small, deterministic concept dataset in the released UniCTokens / UnifyBench++ layout (see rl/data/reader.py).

Three concepts from scikit-image's bundled photos: a human (``astro``), an animal (``chelsea``, a cat) and an object
(``cuppa``, a cup). Written the way the released data is: ``info.json`` without ``category``, no ``reasoning.json``
(the training reasoning prompts are the first half of ``test/<c>/t2i_conditions.json``, index-paired with
``extra_info``), ``concept/train/train_images.json``, a ``mask`` file among the crops, conversations keyed by image
file, t2i_conditions in list form for one concept and dict form for the others, ``test_data/<c>.json`` for two
concepts (the third uses ``vqa.json`` / ``text_only.json``), and a small ``prompts_to_eval.json`` at the root (the
released file lives beside the released code; ``eval.prompts_to_eval`` points at it).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from rl.data.layout import (
    BLACK_NAME,
    RANDOM_IMAGE_SOURCES,
    black_image,
    crop_box,
    dump_json,
    info_record,
    random_images,
    recognition_records,
    save_png,
    skimage_photo,
    square_box,
    t2i_conditions_record,
    test_data_items,
    to_rgb,
)

__all__ = ["write_sample_dataset", "SAMPLE_CONCEPTS", "MARKER"]

MARKER = ".unictask_sample_data"
"""File written at the root so --force only ever deletes a folder this module made."""

# name -> (skimage loader, class word, category, subject box (y0, y1, x0, x1) as fractions)
_SOURCES = {
    "astro": ("astronaut", "woman", "human", (0.0, 0.75, 0.1, 0.75)),
    "chelsea": ("chelsea", "cat", "animal", (0.0, 1.0, 0.25, 0.95)),
    "cuppa": ("coffee", "cup", "object", (0.05, 0.85, 0.1, 0.8)),
}
SAMPLE_CONCEPTS = tuple(_SOURCES)

_TEXT = {
    "astro": {
        "info": "<astro> is a woman astronaut with short wavy brown hair who wears an orange NASA spacesuit.",
        "extra_info": [
            "<astro> wears a blue flight jacket when she travels.",
            "<astro> goes jogging along the beach every morning.",
            "<astro> reads science-fiction novels in her spare time.",
            "<astro> celebrates her birthday with a chocolate cake.",
            "<astro> works in a mission control room full of screens.",
            "<astro> keeps a golden retriever called Apollo.",
        ],
        "reasoning": [("A photo of <astro> dressed for travel.", 0),
                      ("A photo of <astro> doing her morning exercise.", 1),
                      ("A photo of <astro> enjoying her favourite hobby.", 2),
                      ("A photo of <astro> at her birthday party.", 3)],
        "test_t2i": ["A photo of <astro> at work.", "A photo of <astro> with her pet."],
        "qa": [("What is <astro> wearing?", "<astro> is wearing an orange spacesuit with mission patches."),
               ("What colour is <astro>'s hair?", "<astro> has short brown hair."),
               ("What is behind <astro>?", "An American flag and a model of a space shuttle are behind <astro>.")],
    },
    "chelsea": {
        "info": "<chelsea> is a tabby cat with brown and grey striped fur and yellow-green eyes.",
        "extra_info": [
            "<chelsea> wears a red collar with a small bell when she goes outside.",
            "<chelsea> sleeps in a wicker basket next to the fireplace.",
            "<chelsea> plays with a blue ball of yarn.",
            "<chelsea> watches birds from the kitchen window sill.",
            "<chelsea> visited a snowy mountain cabin last winter.",
            "<chelsea> eats salmon from a green ceramic bowl.",
        ],
        "reasoning": [("A photo of <chelsea> going outside.", 0),
                      ("A photo of <chelsea> taking a nap.", 1),
                      ("A photo of <chelsea> with her favourite toy.", 2),
                      ("A photo of <chelsea> at her favourite lookout spot.", 3)],
        "test_t2i": ["A photo of <chelsea> on last winter's trip.", "A photo of <chelsea> at dinner time."],
        "qa": [("What colour are <chelsea>'s eyes?", "<chelsea> has yellow-green eyes."),
               ("What pattern does <chelsea>'s fur have?", "<chelsea> has striped tabby fur."),
               ("Where is <chelsea> looking?", "<chelsea> is looking slightly to the side.")],
    },
    "cuppa": {
        "info": "<cuppa> is a red ceramic espresso cup on a matching red saucer with a silver spoon.",
        "extra_info": [
            "<cuppa> is stored on a wooden shelf in the kitchen.",
            "<cuppa> is used for a cappuccino every Sunday morning.",
            "The price of <cuppa> is $12.",
            "<cuppa> comes along on picnics in a wicker basket.",
            "<cuppa> is always washed by hand, never in a dishwasher.",
            "<cuppa> was a gift from a friend in Naples.",
        ],
        "reasoning": [("A photo of <cuppa> where it is kept.", 0),
                      ("A photo of <cuppa> on a weekend morning.", 1),
                      ("A photo of <cuppa> on a shop shelf with its price tag.", 2),
                      ("A photo of <cuppa> on a summer outing.", 3)],
        "test_t2i": ["A photo of <cuppa> being cleaned.", "A photo of <cuppa> next to a souvenir of where it came from."],
        "qa": [("What is in <cuppa>?", "<cuppa> holds an espresso with golden crema."),
               ("What colour is <cuppa>?", "<cuppa> is red with a white inside."),
               ("What is under <cuppa>?", "A red saucer with a silver spoon is under <cuppa>.")],
    },
}

_DREAMBOOTH = {
    "object": ["a <sks> in the jungle", "a <sks> on top of a wooden floor", "a <sks> with a city in the background"],
    "live_subject": ["a <sks> in the snow", "a <sks> on the beach", "a <sks> wearing a red hat"],
}


def _variants(img: np.ndarray) -> list[tuple[tuple[float, float, float, float], bool]]:
    """Five training views: centre square, its mirror, two small shifts, a zoom."""
    sh = img.shape[:2]
    return [(square_box(1.0, 0.5, 0.5, sh), False), (square_box(1.0, 0.5, 0.5, sh), True),
            (square_box(0.9, 0.45, 0.45, sh), False), (square_box(0.9, 0.55, 0.55, sh), False),
            (square_box(0.8, 0.5, 0.5, sh), True)]


def _write_concept(root: Path, name: str, size: int, t2i_as_list: bool, test_data: bool,
                   log: Callable[[str], None]) -> None:
    loader, cls, category, box = _SOURCES[name]
    text = _TEXT[name]
    img = skimage_photo(loader)
    tr = root / "concept" / "train" / name
    te = root / "concept" / "test" / name
    views = _variants(img)
    for i, (b, flip) in enumerate(views):
        save_png(crop_box(img, b, size, flip), tr / f"{i}.png")
        save_png(crop_box(img, box, size, flip=(i % 2 == 1)), tr / "cropped" / f"{i}.png")
    # a segmentation mask beside the photos, as in the released data: every reader must skip it ("mask" in name)
    save_png(np.where(to_rgb(np.asarray(crop_box(img, views[0][0], size))) > 127, 255, 0).astype(np.uint8),
             tr / "cropped" / "0_mask.png")
    # test images: other views (not used by training)
    save_png(crop_box(img, square_box(0.85, 0.4, 0.6, img.shape[:2]), size), te / "0.png")
    save_png(crop_box(img, square_box(0.85, 0.6, 0.4, img.shape[:2]), size, flip=True), te / "1.png")
    # hard negatives: the photo with colours permuted / inverted (same layout, different appearance)
    neg = root / "concept" / "train" / name / "negative_example"
    save_png(crop_box(img[..., ::-1].copy(), views[0][0], size), neg / "0.png")
    save_png(crop_box(255 - img, views[0][0], size), neg / "1.png")
    dump_json({"0.png": 0.61, "1.png": 0.42}, neg / "score.json")
    # info.json as released: no "category" (derived from conversation_type / class / generation_type)
    dump_json(info_record(cls, category, text["info"], text["extra_info"]), tr / "info.json")
    qa = text["qa"]
    dump_json({f"{i}.png": [{"query": q, "answer": a} for q, a in (qa[i % 3], qa[(i + 1) % 3])]
               for i in range(len(views))}, tr / "conversations.json")
    tok = f"<{name}>"
    pos, rand = recognition_records(tok, [f"{i}.png" for i in range(len(views))],
                                    [f"random_images/{i}.png" for i in range(4)])
    dump_json(pos, tr / "positive_recognitions.json")
    dump_json(rand, tr / "random_recognitions.json")
    dump_json({"0.png": [{"query": qa[0][0], "answer": qa[0][1]}], "1.png": [{"query": qa[1][0], "answer": qa[1][1]}]},
              te / "vqa.json")
    dump_json([{"query": f"What does {tok} do? Answer from what you know.", "answer": text["extra_info"][4]},
               {"query": f"Describe {tok}.", "answer": text["info"]}], te / "text_only.json")
    # personalized-driven prompts, index-paired with extra_info: the first half trains (grpo.py), the rest is held out
    prompts = [p for p, _ in text["reasoning"]] + text["test_t2i"]
    dump_json(t2i_conditions_record(prompts, as_list=t2i_as_list), te / "t2i_conditions.json")
    if test_data:   # gen_test_data.py's output, read by eval/eval_p_mmu.py
        items = test_data_items(tok, [f"concept/test/{name}/{i}.png" for i in range(2)],
                                [f"random_images/{i}.png" for i in range(2)],
                                [(f"concept/test/{name}/{i}.png", qa[i][0], qa[i][1]) for i in range(2)],
                                [(f"Describe {tok}.", text["info"])])
        dump_json(items, root / "test_data" / f"{name}.json")
    log(f"  concept {name}: {category}/{cls}, {len(views)} training images")


def write_sample_dataset(out: str | Path, *, force: bool = False, image_size: int = 512,
                         log: Callable[[str], None] = print) -> Path:
    """Write the sample dataset to ``out`` and return its path.

    ``out`` must not exist or be empty; with ``force`` a folder previously written by this function
    (it holds the marker file) is replaced. Any other non-empty folder is refused (ValueError).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out}: exists and is not empty (use --force to replace a sample dataset)")
        if not (out / MARKER).is_file():
            raise ValueError(f"{out}: not a sample dataset written by this tool ({MARKER} missing); refusing "
                             "to delete it")
        shutil.rmtree(out)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by rl.data.sample.write_sample_dataset\n", encoding="utf-8")
    log(f"writing sample dataset to {out} ({image_size}x{image_size} images)")
    dump_json(list(SAMPLE_CONCEPTS), out / "concepts_list.json")
    save_png(black_image(), out / BLACK_NAME)
    for i, im in enumerate(random_images(image_size)):
        save_png(im, out / "random_images" / f"{i}.png")
    log(f"  random_images: {len(RANDOM_IMAGE_SOURCES)}")
    for i, name in enumerate(SAMPLE_CONCEPTS):
        _write_concept(out, name, image_size, t2i_as_list=(i == 0), test_data=(i < 2), log=log)
    dump_json({name: [f"{i}.png" for i in range(5)] for name in SAMPLE_CONCEPTS},
              out / "concept" / "train" / "train_images.json")
    dump_json(_DREAMBOOTH, out / "prompts_to_eval.json")
    log("done")
    return out
