"""What a training run is asked to do: the recipes (optimisation settings per architecture) and ``TrainConfig``.

Below both ``trainer.train``, which runs a config, and ``trainer.export``, whose model card records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer import models
from trainer.data import SplitSpec

#: Outlier-exposure losses (``Recipe.oe_loss``).
OE_LOSSES = ("uniform", "energy")
#: The energy loss's margins on logsumexp(logits) (known above the first, unknown below the second), set from the
#: shipped model's scale on validation: known drawings' logsumexp has median 4.6 (label smoothing keeps it small),
#: unknown ones' 3.1.
ENERGY_MARGINS = (6.0, 3.0)


@dataclass(frozen=True, slots=True)
class Recipe:
    """Optimisation settings that go with an architecture."""

    epochs: int
    batch_size: int
    learning_rate: float
    schedule: str  # "constant" or "cosine" (with one epoch of linear warm-up)
    label_smoothing: float
    augment: bool
    #: Keras dtype policy for training ("mixed_bfloat16" uses bf16 matrix units where the CPU has them).
    precision: str = "float32"
    #: Test-time views averaged in the served model (see models.TestTimeAugment); () serves the plain model.
    tta: tuple[str, ...] = ()
    #: Decoupled weight decay (AdamW); batch-norm parameters and biases are exempt.
    weight_decay: float = 0.0
    #: Outlier exposure (Hendrycks et al. 2019): weight of the cross-entropy to the uniform distribution on
    #: drawings of unknown classes; 0 turns it off.
    oe_weight: float = 0.0
    #: Extra drawings a step (global): unknown classes' and doodle-rendered known ones, beside ``batch_size``.
    oe_batch_size: int = 0
    #: The outlier-exposure loss: "uniform" (cross-entropy to the uniform distribution, Hendrycks et al. 2019) or
    #: "energy" (squared hinges on logsumexp(logits), Liu et al. 2020 "Energy-based Out-of-distribution
    #: Detection": known drawings pushed above ``oe_margins[0]``, unknown ones below ``oe_margins[1]``; the
    #: known drawings' hinge also weighted by ``oe_weight``).
    oe_loss: str = "uniform"
    oe_margins: tuple[float, float] = ENERGY_MARGINS


#: ``seed`` keeps the starting point's recipe (Adam 1e-4, batch 512, 10 epochs, no augmentation).
RECIPES: dict[str, Recipe] = {
    "seed": Recipe(10, 512, 1e-4, "constant", 0.0, False),
    "qdnet": Recipe(
        24,
        256,
        2e-3,
        "cosine",
        0.1,
        True,
        precision="mixed_bfloat16",
        tta=models.TTA_VIEWS,
        weight_decay=0.05,
        oe_weight=0.5,
        oe_batch_size=64,
    ),
}


@dataclass(slots=True)
class TrainConfig:
    """Everything one training run needs; the CLI fills it, unset fields take the recipe's values."""

    data_dir: Path
    out: Path = Path("models/quickdraw")
    workdir: Path | None = None
    classes: Sequence[str] | None = None
    per_class: int | None = None
    arch: str = models.DEFAULT_ARCH
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    augment: bool | None = None
    precision: str | None = None
    tta: tuple[str, ...] | None = None
    seed: int = 1
    resume: bool = False
    version: int | None = None
    evaluate: bool = True
    split: SplitSpec = field(default_factory=SplitSpec)
    #: Start from the weights of an exported version (fine-tuning) instead of a random initialisation.
    init_from: Path | None = None
    #: Outlier exposure on or off (None: the recipe's, i.e. on when its ``oe_weight`` is positive).
    outlier_exposure: bool | None = None
    oe_weight: float | None = None
    oe_batch_size: int | None = None
    oe_loss: str | None = None

    def recipe(self) -> Recipe:
        """The architecture's recipe with this run's overrides applied."""
        base = RECIPES[self.arch]
        oe = self.outlier_exposure
        return Recipe(
            epochs=self.epochs if self.epochs is not None else base.epochs,
            batch_size=self.batch_size or base.batch_size,
            learning_rate=self.learning_rate or base.learning_rate,
            schedule=base.schedule,
            label_smoothing=base.label_smoothing,
            augment=base.augment if self.augment is None else self.augment,
            precision=self.precision or base.precision,
            tta=base.tta if self.tta is None else self.tta,
            weight_decay=base.weight_decay,
            oe_weight=0.0 if oe is False else (self.oe_weight or base.oe_weight or (0.5 if oe else 0.0)),
            oe_batch_size=0 if oe is False else (self.oe_batch_size or base.oe_batch_size or (64 if oe else 0)),
            oe_loss=self.oe_loss or base.oe_loss,
            oe_margins=base.oe_margins,
        )
