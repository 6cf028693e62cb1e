"""The units DP-SGD protects, and which training rows each holds: a record (one row) or a user
(every row of their records). A rank's units are the groups its Poisson sampling draws from.

With users, each rank holds whole users: a user's rows are never split between ranks, so that
the ranks' draws together are one Poisson draw over all users and each user's clipped gradient
is taken on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import ConfigError


@dataclass(frozen=True)
class PrivacyUnits:
    """Unit ``u`` holds rows ``order[starts[u]:starts[u + 1]]`` of the training blocks."""

    order: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def records(cls, rows: int) -> PrivacyUnits:
        """One unit a row (record-level privacy)."""
        return cls(torch.arange(rows), torch.arange(rows + 1))

    @classmethod
    def grouped(cls, rows: np.ndarray, owners: np.ndarray) -> PrivacyUnits:
        """``rows`` grouped by ``owners`` (one owner a row, any integers): a unit an owner."""
        by_owner = np.argsort(owners, kind="stable")
        _, counts = np.unique(owners[by_owner], return_counts=True)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return cls(
            torch.from_numpy(rows[by_owner].astype(np.int64)), torch.from_numpy(starts.astype(np.int64))
        )

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def rows(self) -> int:
        """The training rows the units hold."""
        return int(self.starts[-1])

    @property
    def single_rows(self) -> bool:
        """Whether every unit holds one row (records)."""
        return self.rows == len(self)

    def draw(
        self, chosen: torch.Tensor, cap: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the ``chosen`` units, at most ``cap`` of each (a random subset of a unit
        that holds more), grouped by unit, and the sizes of the groups."""
        if self.single_rows:
            return self.order[chosen], torch.ones(len(chosen), dtype=torch.long)
        parts, sizes = [], []
        for unit in chosen.tolist():
            rows = self.order[int(self.starts[unit]) : int(self.starts[unit + 1])]
            if len(rows) > cap:
                rows = rows[torch.randperm(len(rows), generator=generator)[:cap]]
            parts.append(rows)
            sizes.append(len(rows))
        if not parts:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(parts), torch.tensor(sizes, dtype=torch.long)


def user_units(
    owners: np.ndarray, rank: int, world: int, cap: int | None = None, allow_empty: bool = False
) -> PrivacyUnits:
    """This rank's users and their rows, from each row's user key (the same on every rank). Users
    are dealt so that the ranks' expected work a step is even: by their rows a step may take (at
    most ``cap``) from most to fewest, ties in key order, in snake order over the ranks (0, 1, ..,
    w-1, w-1, .., 0, 0, ..); a few users with many records do not all land on one rank.
    ConfigError for a rank left without users, unless ``allow_empty``."""
    _, user, rows = np.unique(owners, return_inverse=True, return_counts=True)
    work = rows if cap is None else np.minimum(rows, cap)
    heaviest_first = np.argsort(-work, kind="stable")
    turn = np.arange(len(heaviest_first))
    lap, seat = np.divmod(turn, world)
    dealt = np.empty(len(heaviest_first), dtype=np.int64)
    dealt[heaviest_first] = np.where(lap % 2 == 0, seat, world - 1 - seat)
    mine = np.flatnonzero(dealt[user] == rank)
    if len(mine) == 0 and not allow_empty:
        raise ConfigError(f"data: {len(rows)} users cannot be shared by {world} ranks")
    return PrivacyUnits.grouped(mine, user[mine])


def micro_batches(sizes: torch.Tensor, micro_batch: int) -> list[tuple[int, int]]:
    """Consecutive groups of units as (first unit, end unit), each holding at most ``micro_batch``
    rows unless a single unit holds more: a unit's gradient is then complete within its group."""
    groups = []
    first, held = 0, 0
    for unit, size in enumerate(sizes.tolist()):
        if held and held + size > micro_batch:
            groups.append((first, unit))
            first, held = unit, 0
        held += size
    if held:
        groups.append((first, len(sizes)))
    return groups
