"""Training settings: one dataclass for every method and both CAL stages, with per-stage defaults.

Defaults follow the paper (§5.2) and the authors' configs: Adam, lr 1e-3, x0.1 at
epochs 170 and 200 of 210 for stage 1; stage 2 runs 40 epochs from the stage-1
weights (§4.3, two-stage training). What stage 2 trains and its learning rate are
settings (``stage2_train``, ``lr``); docs/results.md records the measurement that
chose the defaults.

The dataclass is what ``cal-pose train`` builds from its flags, what
:func:`cal_core.train.train` consumes, and (as a plain dict) what every
checkpoint carries, so a run can be described and resumed from its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("heatmap", "dark", "udp", "cal")
MGM_UPDATES = ("static", "batch")
STAGE2_TRAIN = ("all", "offset")
DEVICES = ("auto", "cpu", "cuda")
#: Offset-loss weight alpha of Eq. 8 (udp) and Eqs. 14/15 (cal): the authors' LOSS.OFFSET_WEIGHT = 0.7
#: written in the equations' form (cal_core.losses explains the factor 2 of cal).
DEFAULT_ALPHA = {"udp": 0.7, "cal": 1.4}

#: Paper §5.2: 210 epochs, lr x0.1 at 170 and 200 (other epoch counts: the same shares, paper_lr_steps).
STAGE1_EPOCHS = 210
STAGE1_LR_STEPS = (170, 200)
#: Paper §5.2: the second stage runs 40 epochs.
STAGE2_EPOCHS = 40
#: Stage-2 learning rate (the stage-1 schedule has decayed to 1e-5 by its end).
STAGE2_LR = 1e-4
#: What stage 2 trains by default (see docs/results.md for the measurement).
STAGE2_DEFAULT_TRAIN = "all"


@dataclass
class TrainConfig:
    """Every setting of one training run (CLI flags of ``cal-pose train``, docs/architecture.md)."""

    shards: str
    out: str
    method: str = "cal"
    stage: int = 1
    val_shards: str | None = None
    backbone: str = "tiny"
    head: str = "auto"
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    lr_steps: tuple[int, ...] | None = None
    lr_factor: float = 0.1
    weight_decay: float = 0.0
    alpha: float | None = None  # None: the method's DEFAULT_ALPHA (stays None for heatmap/dark: no offsets)
    workers: int = 2
    init: str | None = None
    weights: str | None = None
    gmm: str | None = None
    mgm_update: str = "static"
    stage2_train: str = STAGE2_DEFAULT_TRAIN
    resume: bool = False
    val_every: int = 1
    val_flip: bool = True
    checkpoint_every: int = 0
    log_every: int = 10
    max_steps: int = 0
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    deterministic: bool = False
    augment: bool = True
    experiment: str | None = None
    run_name: str | None = None
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        """Fill per-stage defaults and reject inconsistent settings with a clear message."""
        if self.stage == 2:
            self.epochs = STAGE2_EPOCHS if self.epochs is None else self.epochs
            self.lr = STAGE2_LR if self.lr is None else self.lr
            self.lr_steps = () if self.lr_steps is None else tuple(self.lr_steps)
        else:
            self.epochs = STAGE1_EPOCHS if self.epochs is None else self.epochs
            self.lr = 1e-3 if self.lr is None else self.lr
            self.lr_steps = paper_lr_steps(self.epochs) if self.lr_steps is None else tuple(self.lr_steps)
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        self.alpha = DEFAULT_ALPHA.get(self.method) if self.alpha is None else self.alpha
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.stage in (1, 2), f"stage must be 1 or 2, got {self.stage!r}"),
            (self.stage == 1 or self.method == "cal", f"stage 2 exists only for method 'cal', not {self.method!r}"),
            (self.stage == 1 or bool(self.init), "stage 2 needs --init (the stage-1 checkpoint)"),
            (self.stage == 1 or bool(self.gmm), "stage 2 needs --gmm (gmm.json from cal-pose fit-gmm)"),
            (self.stage == 1 or not self.weights, "--weights is for stage 1; stage 2 starts from --init"),
            (self.stage == 2 or not self.gmm, "--gmm is for stage 2 (stage 1 trains without the mixture)"),
            (self.stage == 2 or self.mgm_update == "static", "--mgm-update is for stage 2 (the masks of Eq. 15)"),
            (self.stage == 2 or self.stage2_train == STAGE2_DEFAULT_TRAIN, "--stage2-train is for stage 2"),
            (self.alpha is None or self.method in DEFAULT_ALPHA,
             f"--alpha weights the offset loss; method {self.method!r} has no offsets"),
            (self.mgm_update in MGM_UPDATES, f"mgm_update must be one of {MGM_UPDATES}"),
            (self.stage2_train in STAGE2_TRAIN, f"stage2_train must be one of {STAGE2_TRAIN}"),
            (self.device in DEVICES or self.device.startswith("cuda:"), f"device must be one of {DEVICES}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < math.inf, f"lr must be a finite number > 0, got {self.lr}"),
            (self.alpha is None or self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.max_steps >= 0, f"max_steps must be >= 0 (0: whole epochs), got {self.max_steps}"),
            (self.threads >= 0, f"threads must be >= 0 (0: cores minus workers), got {self.threads}"),
            (self.val_every >= 0, f"val_every must be >= 0, got {self.val_every}"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (all(a < b for a, b in zip(self.lr_steps, self.lr_steps[1:], strict=False)),
             f"lr_steps must increase (each epoch once), got {self.lr_steps}"),
            (all(0 < s < self.epochs for s in self.lr_steps),
             f"lr_steps {list(self.lr_steps)} must lie inside the {self.epochs} epochs (a later drop never "
             "happens): give steps for this schedule, 'auto' (the paper's, scaled) or '' (constant)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, not tuples) for checkpoints and run parameters."""
        data = asdict(self)
        data["lr_steps"] = list(self.lr_steps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**data)


def paper_lr_steps(epochs: int) -> tuple[int, ...]:
    """The paper's drops (170 and 200 of 210 epochs) scaled to ``epochs``; none for fewer than 3 epochs."""
    steps = tuple(sorted({round(epochs * s / STAGE1_EPOCHS) for s in STAGE1_LR_STEPS}))
    return tuple(s for s in steps if 0 < s < epochs)


def parse_steps(text: str | None) -> tuple[int, ...] | None:
    """``"170,200"`` -> ``(170, 200)``; ``""`` -> ``()`` (no decay); None or ``"auto"`` -> None (per-stage default)."""
    if text is None or str(text).strip() == "auto":
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"lr steps must be comma-separated epoch numbers, got {text!r}")
    return tuple(int(p) for p in parts)
