"""Configuration of the Dr.GRPO objective and of DSOG screening; no torch here."""
from __future__ import annotations

from dataclasses import dataclass

_POSITIONS = ("all", "newly_unmasked")


@dataclass
class ObjectiveConfig:
    """Hyper-parameters of the Dr.GRPO loss (design D2–D5; paper Table 4)."""

    clip_eps: float = 0.2
    """PPO clip ε: the ratio is clipped to [1-ε, 1+ε]."""
    kl_beta: float = 0.01
    """β of the per-token k3 KL to the frozen reference (0 disables the reference pass)."""
    alpha_und: float = 0.4
    """Weight α_und of the IR text-token term."""
    alpha_gen: float = 0.6
    """Weight α_gen of the image token-step term."""
    max_answer_tokens: int = 100
    """L_text, the constant text normaliser; must equal the answer generator's max_new_tokens."""
    logratio_clamp: float = 10.0
    """|logp - old| and |ref - logp| are clamped to this before exp (Sync-R1 clamps the ratio at 10)."""
    image_positions: str = "all"
    """Image terms per step: "all" (paper / Sync-R1: all N positions at every step, normaliser T·N) or
    "newly_unmasked" (Mask-GRPO style: only positions fixed at that step, normaliser N)."""

    def __post_init__(self) -> None:
        if not self.clip_eps > 0:
            raise ValueError(f"ObjectiveConfig.clip_eps must be > 0, got {self.clip_eps}")
        if self.kl_beta < 0:
            raise ValueError(f"ObjectiveConfig.kl_beta must be >= 0, got {self.kl_beta}")
        if self.alpha_und < 0 or self.alpha_gen < 0:
            raise ValueError(f"ObjectiveConfig.alpha_und/alpha_gen must be >= 0, got "
                             f"{self.alpha_und}/{self.alpha_gen}")
        if self.max_answer_tokens < 1:
            raise ValueError(f"ObjectiveConfig.max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if not self.logratio_clamp > 0:
            raise ValueError(f"ObjectiveConfig.logratio_clamp must be > 0, got {self.logratio_clamp}")
        if self.image_positions not in _POSITIONS:
            raise ValueError(f"ObjectiveConfig.image_positions must be one of {_POSITIONS}, "
                             f"got {self.image_positions!r}")

    @classmethod
    def tiny(cls) -> "ObjectiveConfig":
        """Tiny CPU setting: short answers (L_text 16); everything else as the real defaults."""
        return cls(max_answer_tokens=16)


_RULES = ("momentum", "step")


_SPACES = ("normalized", "raw")


_SCORERS = ("ber", "clip", "unipercept")


@dataclass
class DSOGConfig:
    """DSOG screening and threshold-controller settings (D6; paper Table 4: TPR 0.25, μ 0.12, η 0.8)."""

    enabled: bool = True
    """Screen at all (False = plain GRPO: every first attempt is kept, no screen pass)."""
    screen_step: int = 10
    """MaskGIT step after which the predicted grid is decoded and screened (of T = 50)."""
    target_pass_rate: float = 0.25
    """TPR: the fraction of attempts the threshold aims to let through."""
    mu: float = 0.12
    """μ in the exponent 1 + μ·(TPR − PR)."""
    momentum: float = 0.8
    """η: momentum of the threshold change."""
    max_attempts: int = 4
    """Attempts per sample; at the cap the best-screened attempt is kept (a forced keep)."""
    rule: str = "momentum"
    """"momentum" (paper, D6) or "step" (released code: ±step_size when the proposal moves more)."""
    step_size: float = 0.005
    """Step of the "step" rule, in the rule's space (raw score units with space="raw")."""
    space: str = "normalized"
    """"normalized" (power rule on the running score range, any scale) or "raw" (rule on T itself)."""
    range_margin: float = 0.1
    """Widening of the running [min, max] score range on each side, as a fraction of its width."""
    initial_threshold: float | None = None
    """None = the (1 − TPR) quantile of the first batch's scores; a number = fixed start (released: 0.50)."""
    scorer: str = "ber"
    """Screening expert: "ber" (BLIP-2 image–text, paper), "clip" (released code) or "unipercept" (perceptual
    quality only: screens out ugly previews, blind to the concept)."""
    clip_image_weight: float = 0.65
    """CLIP screen: weight of CLIP-I (image vs reference images)."""
    clip_text_weight: float = 0.35
    """CLIP screen: weight of CLIP-T (image vs prompt)."""

    def __post_init__(self) -> None:
        if self.rule not in _RULES:
            raise ValueError(f"DSOGConfig.rule must be one of {_RULES}, got {self.rule!r}")
        if self.space not in _SPACES:
            raise ValueError(f"DSOGConfig.space must be one of {_SPACES}, got {self.space!r}")
        if self.scorer not in _SCORERS:
            raise ValueError(f"DSOGConfig.scorer must be one of {_SCORERS}, got {self.scorer!r}")
        if not 0.0 < self.target_pass_rate < 1.0:
            raise ValueError(f"DSOGConfig.target_pass_rate must be in (0, 1), got {self.target_pass_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"DSOGConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.max_attempts < 1:
            raise ValueError(f"DSOGConfig.max_attempts must be >= 1, got {self.max_attempts}")
        if self.screen_step < 1:
            raise ValueError(f"DSOGConfig.screen_step must be >= 1, got {self.screen_step}")
        if self.mu < 0 or self.step_size <= 0 or self.range_margin <= 0:
            raise ValueError("DSOGConfig.mu must be >= 0, step_size and range_margin > 0")

    @classmethod
    def tiny(cls) -> "DSOGConfig":
        """Tiny CPU setting: screen after step 2 (tiny samplers run few steps), 2 attempts."""
        return cls(screen_step=2, max_attempts=2)

    @classmethod
    def released_code(cls) -> "DSOGConfig":
        """The released Sync-R1 behaviour: CLIP screen, start 0.50, ±0.005 steps on raw scores."""
        return cls(rule="step", space="raw", initial_threshold=0.5, scorer="clip")
