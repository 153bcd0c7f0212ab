"""Turn data into training units and decide, deterministically, which units every step of every rank sees.

A *unit* is a packed row (packing on) or one sample (packing off). Epoch ``e`` visits the units in the order of a
permutation drawn from ``seed + e``; step ``s`` takes the next ``micro_batch_size * grad_accum * world_size`` units,
cut into micro-batches that are dealt round-robin to the ranks. Nothing here depends on state, so a resumed run needs
only the step number, and a 2-process run sees exactly the micro-batches a 1-process run with the same global batch
sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zhtune.config import Recipe
from zhtune.data.cache import prepare_data
from zhtune.data.packing import collate_packed, collate_padded
from zhtune.data.tokenize import IGNORE_INDEX, TokenizedSample
from zhtune.errors import ConfigError


@dataclass
class TrainData:
    """Units for training and validation plus what loading and tokenizing reported.

    The units are sequences read from the memory-mapped cache of :mod:`zhtune.data.cache` on access (packed rows,
    or samples when packing is off); ``source`` says whether this process built the cache or mapped it.
    """

    train_units: Sequence
    val_units: Sequence
    packed: bool
    pad_id: int
    reports: dict
    source: str = ""


def build_data(recipe: Recipe, tokenizer) -> TrainData:
    """The recipe's data as training units: mapped from the prepared-data cache, built there first if missing.

    Several processes (ranks) may call this at once: one builds, the others wait for it and map its arrays.

    Raises:
        DataError / ConfigError: bad data or settings (file:line, field).
    """
    prepared = prepare_data(recipe, lambda: tokenizer)
    return TrainData(
        prepared.units("train"),
        prepared.units("val"),
        recipe.tokenize.packing,
        prepared.pad_id,
        prepared.reports(),
        prepared.describe(),
    )


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the random numbers (dropout) rank ``rank`` draws at optimizer step ``step``.

    A pure function of its arguments, so every rank draws its own masks (not the same ones ``world_size`` times)
    and a resumed run draws exactly what the uninterrupted one drew, without saving per-rank generator states.
    """
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepSchedule:
    """Which units each rank uses at each optimizer step."""

    def __init__(self, n_units: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.n_units, self.micro, self.accum, self.world, self.seed = (
            n_units,
            micro_batch_size,
            grad_accum,
            world_size,
            seed,
        )
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = n_units // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{n_units} training units are fewer than one global batch of {self.global_batch} "
                "(micro_batch_size x grad_accum x GPUs); add data or lower the batch"
            )
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n_units, generator=gen).tolist())
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        """All micro-batches (unit indices) of ``step``, across ranks, in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        units = self._permutation(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        return [units[i : i + self.micro] for i in range(0, len(units), self.micro)]


def collate(
    units: list, packed: bool, pad_id: int, mask_dtype: torch.dtype | None = torch.float32, device=None
) -> dict[str, torch.Tensor]:
    """Model inputs for ``units``; a packed batch gets a block mask of ``mask_dtype`` (bool for SDPA), built on
    ``device`` when given."""
    return collate_packed(units, mask_dtype, device) if packed else collate_padded(units, pad_id)


def supervised_tokens(units: list) -> int:
    """Tokens that carry a loss (labels shifted by one, as the loss sees them)."""
    return sum(int(np.count_nonzero(np.asarray(u.labels[1:]) != IGNORE_INDEX)) for u in units)


__all__ = ["TrainData", "build_data", "step_seed", "StepSchedule", "collate", "supervised_tokens", "TokenizedSample"]
