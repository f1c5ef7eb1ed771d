"""Helpers shared by the training tests."""

from pathlib import Path

import pytorch_lightning as pl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # read-only data beside the repo


class LossLog(pl.Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def fell(self, k: int = 5) -> bool:
        """Mean of the last k losses below the mean of the first k."""
        return sum(self.losses[-k:]) < sum(self.losses[:k])
