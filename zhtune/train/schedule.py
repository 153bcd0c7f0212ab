"""Turn data into training units and decide, deterministically, which units every step of every rank sees.

A *unit* is a packed row (packing on) or one sample (packing off). Epoch ``e`` visits the units in the order of a
permutation drawn from ``seed + e``; step ``s`` takes the next ``micro_batch_size * grad_accum * world_size`` units,
cut into micro-batches that are dealt round-robin to the ranks. Nothing here depends on state, so a resumed run needs
only the step number, and a 2-process run sees exactly the micro-batches a 1-process run with the same global batch
sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zhtune.config import Recipe
from zhtune.data.conversation import Conversation
from zhtune.data.formats import load_conversations
from zhtune.data.packing import collate_packed, collate_padded, pack_samples
from zhtune.data.templates import RenderOptions, get_template
from zhtune.data.tokenize import IGNORE_INDEX, TokenizedSample, tokenize_dataset
from zhtune.errors import ConfigError


@dataclass
class TrainData:
    """Units for training and validation plus what loading and tokenizing reported."""

    train_units: list
    val_units: list
    packed: bool
    pad_id: int
    reports: dict


def split_validation(convs: list[Conversation], val_size: float, seed: int) -> tuple[list, list]:
    """Hold out ``val_size`` (a fraction below 1, or a count) of the conversations, chosen with ``seed``."""
    n_val = int(val_size) if val_size >= 1 else int(round(len(convs) * val_size))
    if n_val <= 0:
        return convs, []
    if n_val >= len(convs):
        raise ConfigError(f"train.val_size {val_size} leaves no training data ({len(convs)} conversations)")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def build_data(recipe: Recipe, tokenizer) -> TrainData:
    """Load, split, tokenize and (optionally) pack the recipe's data."""
    convs, load_report = load_conversations(recipe.data.paths, recipe.data)
    train_convs, val_convs = split_validation(convs, recipe.train.val_size, recipe.train.seed)
    template = get_template(recipe.template.name)
    options = RenderOptions(system=recipe.template.system, enable_thinking=recipe.template.enable_thinking)
    train_samples, train_report = tokenize_dataset(train_convs, tokenizer, template, recipe.tokenize, options)
    val_samples, val_report = tokenize_dataset(val_convs, tokenizer, template, recipe.tokenize, options)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if recipe.tokenize.packing:
        train_units = pack_samples(train_samples, recipe.tokenize.cutoff_len, pad_id)
        val_units = pack_samples(val_samples, recipe.tokenize.cutoff_len, pad_id) if val_samples else []
    else:
        train_units, val_units = train_samples, val_samples
    reports = {"load": load_report.summary(), "train": train_report.summary(), "val": val_report.summary()}
    return TrainData(train_units, val_units, recipe.tokenize.packing, pad_id, reports)


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

    def for_rank(self, step: int, rank: int) -> list[list[int]]:
        return self.micro_batches(step)[rank :: self.world]


def collate(
    units: list, packed: bool, pad_id: int, mask_dtype: torch.dtype | None = torch.float32, device=None
) -> dict[str, torch.Tensor]:
    """Model inputs for ``units``; a packed batch gets a block mask of ``mask_dtype`` (bool for SDPA), built on
    ``device`` when given."""
    return collate_packed(units, mask_dtype, device) if packed else collate_padded(units, pad_id)


def supervised_tokens(units: list) -> int:
    """Tokens that carry a loss (labels shifted by one, as the loss sees them)."""
    total = 0
    for u in units:
        labels = u.labels
        total += sum(1 for label in labels[1:] if label != IGNORE_INDEX)
    return total


__all__ = ["TrainData", "build_data", "StepSchedule", "collate", "supervised_tokens", "TokenizedSample"]
