"""Checking a user's folder of concept photos before anything is written (``python -m launch.new_concept``).

Every file of the folder is looked at; each one is either **usable** or **refused with a reason**:

* not an image (extension outside :data:`rl.data.files.IMAGE_EXTS`), cannot be decoded (broken, truncated, empty),
  too small (shorter side < ``min_side``), too large (> ``max_pixels``, checked from the header before decoding),
  too elongated (aspect ratio > ``max_aspect``: a centred square crop would lose the subject);
* a **near-duplicate** of an earlier usable photo: the 64-bit difference hash (dHash: a 9×8 grey thumbnail, one bit
  per horizontal neighbour pair) within ``max_hash_distance`` bits (re-encodes, resizes and tiny crops of the same
  shot land within a few bits; different shots of a subject usually differ by 10+).

Photos are decoded with their EXIF orientation applied (phone photos). At least ``min_photos`` must be usable. For a
human concept, MTCNN (the FER expert's detector: :func:`rewards.fer.make_detector`, :func:`rewards.fer.pick_face`)
must find a face in at least ``min_face_share`` of them; the face boxes are kept for the face crops. Pure functions,
no Ray; torch is imported only for a human concept's face check.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from rl.data.files import IMAGE_EXTS

__all__ = ["PhotoLimits", "Photo", "PhotoReport", "PhotoError", "check_photos", "decode_photo", "dhash", "hamming",
           "centre_square", "face_square", "detect_faces"]


class PhotoError(ValueError):
    """The photo folder cannot make a concept; the message says why in one line."""


@dataclass
class PhotoLimits:
    """What makes a photo usable (the ``launch.new_concept`` options of the same names)."""

    min_photos: int = 5
    """Usable photos needed (training photos + held-out test photos)."""
    test_photos: int = 2
    """Usable photos held out as the concept's test photos (the last ones, in natural file-name order)."""
    min_side: int = 256
    """Shorter side below this: refused (Show-o trains at 512 px)."""
    max_pixels: int = 50_000_000
    """More pixels than this: refused before decoding (a wrong file or a decompression bomb)."""
    max_aspect: float = 3.0
    """Longer / shorter side above this: refused."""
    max_hash_distance: int = 5
    """dHash Hamming distance (of 64 bits) at or below which a photo is a near-duplicate of an earlier one."""
    min_face_share: float = 0.5
    """Human concepts: share of the usable photos in which MTCNN must find a face."""
    min_face_prob: float = 0.9
    """MTCNN detection probability a face needs (the FER expert's ``min_face_prob``)."""

    def validate(self) -> None:
        """PhotoError on impossible values."""
        if self.test_photos < 0 or self.min_photos < self.test_photos + 1:
            raise PhotoError(f"--min-photos ({self.min_photos}) must leave at least one training photo after "
                             f"--test-photos ({self.test_photos})")
        if self.min_side < 16 or self.max_pixels < self.min_side ** 2 or self.max_aspect < 1:
            raise PhotoError("--min-side must be >= 16, --max-pixels >= min-side², --max-aspect >= 1")
        if not 0 <= self.max_hash_distance < 64 or not 0 < self.min_face_share <= 1:
            raise PhotoError("--max-hash-distance must be in [0, 64) and --min-face-share in (0, 1]")


@dataclass
class Photo:
    """A usable photo."""

    path: Path
    """The source file."""
    rgb: np.ndarray
    """uint8 RGB [H, W, 3], EXIF orientation applied."""
    hash: int
    """64-bit dHash."""
    face: np.ndarray | None = None
    """Human concepts: MTCNN's box (x0, y0, x1, y1) of the largest confident face, or None."""


@dataclass
class PhotoReport:
    """The outcome of :func:`check_photos`."""

    usable: list[Photo]
    """Usable photos in natural file-name order."""
    refused: dict[str, str] = field(default_factory=dict)
    """File name → why it was refused."""

    def summary(self) -> str:
        """``"n usable; refused: a.jpg (why), ..."``."""
        ref = "; ".join(f"{k} ({v})" for k, v in self.refused.items())
        return f"{len(self.usable)} usable" + (f"; refused: {ref}" if ref else "")


def _natural_key(p: Path) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", p.name) if t)


def decode_photo(path: Path, limits: PhotoLimits) -> np.ndarray:
    """uint8 RGB of ``path`` with its EXIF orientation applied; PhotoError (the reason, no path) when it is not usable
    under ``limits``."""
    if path.stat().st_size == 0:
        raise PhotoError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise PhotoError(f"{w}x{h} = {w * h} pixels, above --max-pixels {limits.max_pixels}")
            im.load()   # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES is not consulted below)
            im = ImageOps.exif_transpose(im)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except PhotoError:
        raise
    except Image.DecompressionBombError as e:
        raise PhotoError(f"too large to decode ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise PhotoError(f"cannot decode ({type(e).__name__}: {e})") from e
    h, w = arr.shape[:2]
    if min(h, w) < limits.min_side:
        raise PhotoError(f"{w}x{h}, shorter side below --min-side {limits.min_side}")
    if max(h, w) / min(h, w) > limits.max_aspect:
        raise PhotoError(f"{w}x{h}, aspect ratio {max(h, w) / min(h, w):.2f} above --max-aspect {limits.max_aspect}")
    return np.ascontiguousarray(arr)


def dhash(rgb: np.ndarray) -> int:
    """64-bit difference hash: grey 9×8 thumbnail (box filter), bit = left pixel brighter than its right neighbour."""
    g = np.asarray(Image.fromarray(rgb).convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (g[:, :-1] > g[:, 1:]).reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return bin(a ^ b).count("1")


def detect_faces(images: list[np.ndarray], min_face_prob: float, max_side: int = 1024) -> list[np.ndarray | None]:
    """Per image, the FER expert's MTCNN box (x0, y0, x1, y1) of the largest face with probability >=
    ``min_face_prob``, or None; large photos are detected on a copy whose longer side is ``max_side`` (boxes are
    scaled back)."""
    from rewards.fer import FerConfig, detect_one_by_one, make_detector

    detector = make_detector(FerConfig(min_face_prob=min_face_prob))
    small, scales = [], []
    for img in images:
        s = min(1.0, max_side / max(img.shape[:2]))
        if s < 1.0:
            h, w = img.shape[:2]
            img = np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                         Image.Resampling.BILINEAR))
        small.append(img)
        scales.append(s)
    found = detect_one_by_one(detector, small, min_face_prob)
    return [None if f is None else np.asarray(f[0], np.float64) / s for f, s in zip(found, scales)]


def check_photos(folder: str | Path, limits: PhotoLimits, category: str,
                 face_detector: Callable[[list[np.ndarray], float], list] | None = None) -> PhotoReport:
    """Check every file of ``folder`` (module docstring); PhotoError with one line naming the folder, the counts
    and each refused file's reason when the folder cannot make a concept."""
    limits.validate()
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"--photos {folder}: not a directory")
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=_natural_key)
    report = PhotoReport(usable=[])
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS:
            report.refused[p.name] = f"not an image file ({', '.join(IMAGE_EXTS)})"
            continue
        if "mask" in p.name:
            report.refused[p.name] = "name contains 'mask' (the released code skips such files)"
            continue
        try:
            rgb = decode_photo(p, limits)
        except PhotoError as e:
            report.refused[p.name] = str(e)
            continue
        h = dhash(rgb)
        twin = next((q for q in report.usable if hamming(q.hash, h) <= limits.max_hash_distance), None)
        if twin is not None:
            report.refused[p.name] = (f"near-duplicate of {twin.path.name} (dHash distance {hamming(twin.hash, h)} "
                                      f"<= --max-hash-distance {limits.max_hash_distance})")
            continue
        report.usable.append(Photo(p, rgb, h))
    if len(report.usable) < limits.min_photos:
        what = "no files" if not files else report.summary()
        raise PhotoError(f"--photos {folder}: {len(report.usable)} usable photo(s), {limits.min_photos} needed "
                         f"(--min-photos); {what}")
    if category == "human":
        boxes = (face_detector or detect_faces)([ph.rgb for ph in report.usable], limits.min_face_prob)
        for ph, box in zip(report.usable, boxes):
            ph.face = box
        with_face = sum(b is not None for b in boxes)
        need = max(1, math.ceil(limits.min_face_share * len(report.usable)))
        train = report.usable[:len(report.usable) - limits.test_photos]
        if with_face < need or not any(ph.face is not None for ph in train):
            none = [ph.path.name for ph in report.usable if ph.face is None]
            raise PhotoError(f"--photos {folder}: MTCNN finds a face (probability >= {limits.min_face_prob}) in "
                             f"{with_face} of {len(report.usable)} usable photos of this human concept, {need} needed "
                             f"(--min-face-share {limits.min_face_share}, at least one among the training photos); "
                             f"no face in: {', '.join(none)}")
    return report


def centre_square(rgb: np.ndarray) -> tuple[int, int, int]:
    """(y0, x0, side) of the centred square of ``rgb``."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s


def face_square(rgb: np.ndarray, box: np.ndarray, scale: float = 2.2) -> tuple[int, int, int]:
    """(y0, x0, side) of a square of ``scale`` × the face box's longer side around the face (head and shoulders),
    centred a little below the box centre, shifted (and if need be shrunk) to stay inside the image."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = int(round(min(max(x1 - x0, y1 - y0) * scale, h, w)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.1 * (y1 - y0)
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    return top, left, max(side, 1)
