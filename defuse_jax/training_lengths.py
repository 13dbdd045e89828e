"""Training lengths that follow the data size: a step budget per model, from which epochs follow.

Lengths set in epochs do not carry over between datasets: the 120 VAE epochs that suit 1,145
digits (2,040 steps) are 96,000 steps on 51,000 Fashion-MNIST images. So a length left unset
(`TrainConfig.epochs=None`, `CorrectConfig.epoch_steps=None`, the defaults) is derived from the
training split's size `n` at batch size `b` (`n // b` steps per epoch):

| what | rule | digits (n = 1,145) | Fashion-MNIST (n = 51,000) |
|---|---|---:|---:|
| VAE epochs | 2,040 steps, at least 5 epochs | 120 | 5 |
| classifier epochs | 680 steps, at least 5 epochs | 40 | 5 |
| oracle epochs | twice the classifier's | 80 | 10 |
| correction round | at most 25 steps (one epoch when shorter), 20 rounds per lambda | 17 | 25 |
| churn images (shifted 4 ways) | at most 2,048 training images | 4 x 1,145 | 4 x 2,048 |

The budgets are the digits defaults the README's tables were measured with, so digits runs are
unchanged. A value set explicitly (a flag such as `--vae-epochs 50`, or in the config) is kept
as it is. `run_config.resolved_lengths` applies the rules to a whole run's configuration, and
`pipeline.run` records the values it used in config.json (`"lengths"`).
"""

from __future__ import annotations

import dataclasses

from defuse_jax.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """Aim for `steps` optimisation steps, in whole epochs, and at least `min_epochs`."""

    steps: int
    min_epochs: int = 1

    def epochs(self, n_train: int, batch_size: int) -> int:
        per_epoch = max(1, n_train // batch_size)
        return max(self.min_epochs, round(self.steps / per_epoch))


VAE_BUDGET = StepBudget(steps=2040, min_epochs=5)
CLASSIFIER_BUDGET = StepBudget(steps=680, min_epochs=5)
ORACLE_EPOCHS_FACTOR = 2  # the oracle trains twice as long as the classifier
CORRECTION_ROUND_STEPS = 25  # most steps between two of the correction's candidates
CHURN_IMAGES = 2048  # most training images the choice scores shifted (x 4 shifts)


def train_epochs(train: TrainConfig, budget: StepBudget, n_train: int) -> TrainConfig:
    """`train` with its epochs from `budget` when they are unset (None)."""
    if train.epochs is not None:
        return train
    return dataclasses.replace(train, epochs=budget.epochs(n_train, train.batch_size))


def correction_round_steps(epoch_steps: int | None, n_train: int, batch_size: int) -> int:
    """Steps per correction round: `epoch_steps` when set, else one epoch of at most
    `CORRECTION_ROUND_STEPS` steps."""
    per_epoch = max(1, n_train // batch_size)
    return min(per_epoch, epoch_steps if epoch_steps is not None else CORRECTION_ROUND_STEPS)


def oracle_epochs(classifier_train: TrainConfig) -> int | None:
    """The oracle's epochs: twice the classifier's."""
    if classifier_train.epochs is None:
        return None
    return ORACLE_EPOCHS_FACTOR * classifier_train.epochs
