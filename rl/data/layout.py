"""Writing the released UniCTokens / UnifyBench++ layout: the pieces every writer of a concept shares.

One rule, one place: the sample dataset (:mod:`rl.data.sample`) and a user's own concept
(:mod:`rl.data.new_concept`) write ``info.json``, the recognition QA files, ``t2i_conditions.json``,
``test_data/<c>.json`` items, the root's ``black_512x512.png`` and ``random_images/`` through these functions, so the
files both produce are the shapes :mod:`rl.data.reader` (and the released code it follows) reads. Pure functions, no
Ray, no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from rl.data.files import T2I_DEFAULT_KEY

__all__ = ["dump_json", "json_bytes", "save_png", "png_bytes", "to_rgb", "skimage_photo", "square_box", "crop_box",
           "info_record", "generation_type", "recognition_records", "t2i_conditions_record", "test_data_items",
           "black_image", "random_images", "RANDOM_IMAGE_SOURCES", "BLACK_NAME", "REC_QUESTION"]

BLACK_NAME = "black_512x512.png"
"""The image input of text-only tasks, at the dataset root (released ``grpo.py``)."""
RANDOM_IMAGE_SOURCES = ("camera", "rocket", "coins", "hubble_deep_field")
"""scikit-image photos written as ``random_images/0..3.png`` (easy negatives) in a new dataset root."""
REC_QUESTION = "Is {tok} in this photo?"
"""The recognition question of the recognition QA files and the Rec. test items."""


# ------------------------------------------------------------------------------------------ bytes on disk
def json_bytes(obj: object) -> bytes:
    """The JSON text every writer uses (indent 2, UTF-8, trailing newline)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def dump_json(obj: object, path: Path) -> None:
    """Write ``obj`` as :func:`json_bytes` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json_bytes(obj))


def png_bytes(im: Image.Image | np.ndarray) -> bytes:
    """``im`` encoded as PNG (compression level 6)."""
    import io

    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(im: Image.Image | np.ndarray, path: Path) -> None:
    """Write ``im`` as PNG to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(im))


# ------------------------------------------------------------------------------------------ pixels
def to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a bool / grey / RGB(A) array."""
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def skimage_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos (``skimage.data.<name>()``) as uint8 RGB."""
    import skimage.data

    return to_rgb(getattr(skimage.data, name)())


def square_box(frac: float, cy: float, cx: float, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """A square box (y0, y1, x0, x1 as fractions) of side frac·min(h, w) centred at (cy, cx), kept inside the image."""
    h, w = shape
    s = frac * min(h, w)
    y0 = min(max(cy * h - s / 2, 0), h - s)
    x0 = min(max(cx * w - s / 2, 0), w - s)
    return (y0 / h, (y0 + s) / h, x0 / w, (x0 + s) / w)


def crop_box(img: np.ndarray, box: tuple[float, float, float, float], size: int, flip: bool = False) -> Image.Image:
    """The box (y0, y1, x0, x1 as fractions) of ``img`` resized to ``size``×``size`` (bicubic), optionally mirrored."""
    h, w = img.shape[:2]
    y0, y1, x0, x1 = box
    y0, y1 = int(round(y0 * h)), max(int(round(y1 * h)), int(round(y0 * h)) + 1)
    x0, x1 = int(round(x0 * w)), max(int(round(x1 * w)), int(round(x0 * w)) + 1)
    im = Image.fromarray(img[y0:y1, x0:x1]).resize((size, size), Image.Resampling.BICUBIC)
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def black_image() -> np.ndarray:
    """The 512×512 black placeholder (``black_512x512.png``)."""
    return np.zeros((512, 512, 3), np.uint8)


def random_images(size: int) -> list[Image.Image]:
    """The easy negatives of a new dataset root: :data:`RANDOM_IMAGE_SOURCES`, centre squares at ``size`` px."""
    out = []
    for name in RANDOM_IMAGE_SOURCES:
        src = skimage_photo(name)
        out.append(crop_box(src, square_box(1.0, 0.5, 0.5, src.shape[:2]), size))
    return out


# ------------------------------------------------------------------------------------------ JSON records
def generation_type(category: str) -> str:
    """``prompts_to_eval.json``'s list key of a category: "object" for objects, else "live_subject"."""
    return "object" if category == "object" else "live_subject"


def info_record(class_word: str, category: str, info: str, extra_info: list[str], *,
                explicit_category: bool = False) -> dict:
    """``concept/train/<c>/info.json``: ``class``, ``info`` (profile), ``extra_info`` (facts), ``conversation_type``
    (the released ``pdata.get_concept_info`` reads it) and ``generation_type``; ``category`` too when
    ``explicit_category`` (the released files have none; the reader derives it, see
    :func:`rl.data.files.derive_category`)."""
    rec = {"class": class_word, "info": info, "extra_info": list(extra_info), "conversation_type": category,
           "generation_type": generation_type(category)}
    if explicit_category:
        rec["category"] = category
    return rec


def recognition_records(tok: str, image_keys: list[str], random_keys: list[str]) -> tuple[dict, list]:
    """(``positive_recognitions.json``, ``random_recognitions.json``): a yes per training photo key, a no per random
    image (paths relative to the dataset root); with no random image, one no without an image (its wording is what
    injection uses)."""
    q = REC_QUESTION.format(tok=tok)
    pos = {k: [{"query": q, "answer": f"Yes, {tok} is in this photo."}] for k in image_keys}
    no = f"No, {tok} is not in this photo."
    neg = [{"image": k, "query": q, "answer": no} for k in random_keys] or [{"query": q, "answer": no}]
    return pos, neg


def t2i_conditions_record(prompts: list[str], as_list: bool = False) -> list | dict:
    """``concept/test/<c>/t2i_conditions.json``: the dict form ``grpo.py`` reads, or the plain list form."""
    return list(prompts) if as_list else {T2I_DEFAULT_KEY: list(prompts)}


def test_data_items(tok: str, positives: list[str], negatives: list[str], vqa: list[tuple[str, str, str]],
                    text_only: list[tuple[str, str]]) -> list[dict]:
    """``test_data/<c>.json`` (``gen_test_data.py``'s output, read by ``eval/eval_p_mmu.py``): Rec. yes items on
    ``positives``, no items on ``negatives`` (image paths relative to the dataset root), VQA items (image, question,
    answer) and text-only items (question, answer) on the black image."""
    def item(image: str, kind: str, q: str, a: str) -> dict:
        return {"image": image, "type": kind, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                                {"from": "gpt", "value": a}]}
    rec = REC_QUESTION.format(tok=tok)
    return ([item(p, "rec", rec, "Yes.") for p in positives] + [item(n, "rec", rec, "No.") for n in negatives]
            + [item(i, "vqa", q, a) for i, q, a in vqa] + [item(BLACK_NAME, "text_only", q, a) for q, a in text_only])
