"""A deterministic, seeded, shuffled, resumable iterator with per-host sharding.

Epoch ``e`` visits the items in the order ``permutation(seed, e)`` (numpy PCG64 seeded with
``[seed, e]``). With several hosts, each epoch's permutation is cut into ``process_count``
equal, disjoint blocks (the last ``len(items) % process_count`` positions of the permutation
are left out that epoch; a different set every epoch) and host ``process_index`` reads block
``process_index``. All hosts therefore cross epoch boundaries at the same step.

The position is a small JSON-able dict ``{"epoch", "index", "seed"}`` (``index`` counts items
already taken from this host's block of the current epoch): save it with the checkpoint and
resume with :meth:`ShuffledIterator.from_state` or :meth:`ShuffledIterator.set_state`.
"""
from __future__ import annotations

from typing import Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``range(n)`` in ``epoch`` for ``seed`` (deterministic)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(n)


class ShuffledIterator(Generic[T]):
    """Endless, epoch-wise shuffled iteration over ``items``; see the module docstring."""

    def __init__(
        self,
        items: Sequence[T],
        seed: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        state: dict | None = None,
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index={process_index}, process_count={process_count}")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.items = items
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = bool(shuffle)
        self.epoch_size = len(items) // self.process_count
        if self.epoch_size == 0:
            raise ValueError(
                f"{len(items)} items cannot give each of {process_count} hosts at least one"
            )
        self.seed = int(seed)
        self.epoch = 0
        self.index = 0
        self._cache: tuple[int, np.ndarray] | None = None
        if state is not None:
            self.set_state(state)

    @classmethod
    def from_state(
        cls,
        items: Sequence[T],
        state: dict,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ) -> "ShuffledIterator[T]":
        return cls(
            items, int(state["seed"]), process_index=process_index,
            process_count=process_count, shuffle=shuffle, state=state,
        )

    # ---- position ----------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed)}

    def set_state(self, state: dict) -> None:
        epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        if epoch < 0 or not 0 <= index <= self.epoch_size:
            raise ValueError(f"state {state} out of range (epoch size {self.epoch_size})")
        if seed != self.seed:
            self._cache = None
        self.epoch, self.index, self.seed = epoch, index, seed

    # ---- order -------------------------------------------------------------------------
    def host_indices(self, epoch: int) -> np.ndarray:
        """Indices into ``items`` that this host reads in ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.items)
        perm = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
        lo = self.process_index * self.epoch_size
        block = perm[lo : lo + self.epoch_size]
        self._cache = (epoch, block)
        return block

    def next_indices(self, k: int) -> list[int]:
        """The next ``k`` item indices (crossing epoch boundaries as needed)."""
        if k < 0:
            raise ValueError("k must be >= 0")
        out: list[int] = []
        while len(out) < k:
            if self.index >= self.epoch_size:
                self.epoch += 1
                self.index = 0
            block = self.host_indices(self.epoch)
            take = min(k - len(out), self.epoch_size - self.index)
            out.extend(int(i) for i in block[self.index : self.index + take])
            self.index += take
        return out

    def next_batch(self, k: int) -> list[T]:
        """The next ``k`` items (crossing epoch boundaries as needed)."""
        return [self.items[i] for i in self.next_indices(k)]

    def __iter__(self) -> "ShuffledIterator[T]":
        return self

    def __next__(self) -> T:
        return self.next_batch(1)[0]

    def __repr__(self) -> str:
        return (
            f"ShuffledIterator(n={len(self.items)}, host {self.process_index}/{self.process_count}, "
            f"state={self.get_state()})"
        )

