"""Configuration of the held-out evaluation; no torch here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalConfig:
    """UnifyBench++ evaluation (launch.evaluate and the periodic held-out eval of a run, run.eval_every)."""

    max_new_tokens: int = 100
    """Greedy answer length of every understanding question (UniCTokens' eval: 100)."""
    images_per_prompt: int = 1
    """Images generated per generation prompt."""
    rec_question: str = "Is <c> in this photo?"
    """Recognition question; "<c>" becomes the concept token. Answers are read by their first yes / no."""
    max_rec_positive: int | None = None
    """Cap on positive recognition images per concept (None = all test images)."""
    max_rec_negative: int | None = None
    """Cap on negative recognition images per concept (None = all other concepts' test images + random_images)."""
    max_vqa: int | None = None
    """Cap on VQA questions per concept."""
    max_qa: int | None = None
    """Cap on text-only QA questions per concept."""
    max_rea: int | None = None
    """Cap on reasoning items (Rea. and Rea. Gen.) per concept."""
    max_gen_prompts: int | None = None
    """Cap on Pure Gen. prompts per concept (None = the whole DreamBench list)."""
    prompts_to_eval: str | None = None
    """The released prompts_to_eval.json (DreamBench prompts by generation_type, kept beside the released code, not
    in the data): Pure Gen. uses exactly its list. None = <data.root>/prompts_to_eval.json if present, else a loud
    warning and Pure Gen. falls back to the single prompt "A photo of <c>."; a given path that is missing is an
    error."""
    seed: int = 0
    """Seed of every image draw (with concept, kind, prompt and image index; independent of the run seed and step,
    so evaluations at different steps use the same noise)."""
    batch_size: int = 8
    """Questions / images per forward batch (results do not depend on it)."""
    clip: bool = True
    """Compute CLIP-I / CLIP-T (the CLIP expert of serve.clip: ViT-B/32 openai by default, tiny in tiny configs)."""
    face: bool = True
    """Compute face similarity for human concepts (the FER expert of serve.fer)."""
    judge: str | None = None
    """Registered judge (rl.eval.judge) for Dense Rea. / Dense Gen.; None = not computed."""
    judge_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the judge's factory."""
    train_limit: int | None = 2
    """During training (run.eval_every): cap on every per-concept list above, so the periodic eval stays short."""
    write_during_training: bool = True
    """During training: also write JSON / Markdown / grid to <run>/eval/step_<N>/."""
    grid_cell: int = 128
    """Side of one image in the PNG grid."""

    def validate(self) -> None:
        """Reject impossible values."""
        if self.max_new_tokens < 1 or self.images_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("eval.max_new_tokens, eval.images_per_prompt and eval.batch_size must be >= 1")
        if "<c>" not in self.rec_question:
            raise ValueError(f"eval.rec_question must contain '<c>', got {self.rec_question!r}")
