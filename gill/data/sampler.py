"""A distributed sampler that can start mid-epoch, for exact resume.

Every rank draws the same per-epoch permutation (seeded by ``seed + epoch``) and takes every
``num_replicas``-th index; ``start`` skips the samples this rank already consumed, so a resumed run
neither repeats nor drops a sample (and never decodes the skipped ones).
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if num_samples < num_replicas:
            raise ValueError(f"dataset of {num_samples} samples is smaller than the {num_replicas} ranks")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = num_samples // num_replicas  # the tail is dropped so ranks stay in step

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        mine = order[: self.per_rank * self.num_replicas][self.rank :: self.num_replicas]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
