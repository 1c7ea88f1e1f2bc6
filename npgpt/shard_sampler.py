"""Training windows from token shards: which (T+1)-token windows a run reads, in which order, and where it is.

Glossary: B = batch size (the global batch, split among W ranks), T = context length, W = world size
(MPI ranks), r = this rank.

`ShardWindows` numbers the windows of a list of shards: window j of shard s covers its tokens
[j * stride, j * stride + T + 1) (inputs the first T, targets the last T); a window never crosses a
shard's end. It has the interface of npgpt.data.TokenWindows (len, batch, ordered_batches), so the
validation loop reads shards as it reads a text's windows.

`WindowSampler` draws the training batches: epoch e visits the shards in a seeded order, and within each
shard its windows in a seeded order; batches are the next B windows of that stream (a batch can span two
shards, or two epochs). Both orders are pure functions of (seed, epoch, shard), so the position is three
numbers (epoch, shard, window): `state()` is a small JSON-able dict, `restore(state)` continues exactly,
across shard and epoch boundaries, with any number of ranks. Only one shard's order is held at a time,
so memory does not grow with the corpus (llm.c shuffles the same way: shards, then windows within one).

Under MPI, rank r of W reads only rows [r * B/W, (r+1) * B/W) of every global batch, and every rank
advances the same global position, so a checkpoint's data position is the same on all ranks.

    windows = ShardWindows(find_shards("data/mycorpus").train, context_length=1024)
    sampler = WindowSampler(windows, batch_size=16, seed=0, rank=world.rank, world_size=world.size)
    x, y = sampler.next()                      # (16 / W, 1024) int64 each: this rank's rows
    state = sampler.state()                    # into the checkpoint
    sampler.restore(state)                     # on --resume

`shard_batches(specs, T, B, seed, ...)` does the finding and building in one call for the training loop.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .shards import ShardFile


class ShardWindows:
    """The windows of T+1 tokens at a stride over a list of shards (a window lies inside one shard)."""

    def __init__(self, shards: list[ShardFile], context_length: int, stride: int | None = None, name: str = "train"):
        T = int(context_length)
        stride = T if stride is None else int(stride)
        if T < 1 or stride < 1:
            raise ValueError(f"context length and stride must be at least 1, got {T} and {stride}")
        self.shards = list(shards)
        self.context_length, self.stride, self.name = T, stride, name
        self.counts = np.array([(s.n_tokens - T - 1) // stride + 1 if s.n_tokens > T else 0 for s in self.shards],
                               dtype=np.int64)  # fmt: skip
        self.first = np.concatenate([[0], np.cumsum(self.counts)])  # window index of each shard's first window
        if self.first[-1] == 0:
            largest = max((s.n_tokens for s in self.shards), default=0)
            raise ValueError(f"the {name} shards hold no window of context_length + 1 = {T + 1} tokens (the largest "
                             f"holds {largest:,}); lower --context-length or give more data")  # fmt: skip

    def __len__(self) -> int:
        return int(self.first[-1])

    def fingerprint(self) -> str:
        """Identifies the windows: the shards (names and sizes), T and the stride."""
        parts = [f"{s.path.rsplit('/', 1)[-1]}:{s.n_tokens}" for s in self.shards] + [f"T={self.context_length}", f"stride={self.stride}"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def windows(self, indices) -> np.ndarray:
        """(len(indices), T+1) uint16: the windows, read shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        shard_of = np.searchsorted(self.first, indices, side="right") - 1  # (k,)
        out = np.empty((len(indices), self.context_length + 1), dtype=np.uint16)  # (k, T+1)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            starts = (indices[rows] - self.first[s]) * self.stride
            out[rows] = self.shards[s].read(starts, self.context_length + 1)
        return out

    def batch(self, indices):
        """(inputs, targets), each (len(indices), T) int64: the windows' first and last T tokens."""
        w = self.windows(indices).astype(np.int64)  # (k, T+1)
        return w[:, :-1], w[:, 1:]  # (k, T), (k, T)

    def ordered_batches(self, batch_size: int):
        """Every window once, in order, the last batch possibly smaller (for evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self.batch(np.arange(i, min(i + batch_size, len(self))))


class WindowSampler:
    """Endless training batches from shards in a seeded order, resumable from `state()`; see the module."""

    def __init__(self, windows: ShardWindows, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must split evenly among {world_size} ranks (rank {rank})")
        if len(windows) < batch_size:
            raise ValueError(f"the {windows.name} shards hold {len(windows)} windows of {windows.context_length} tokens, "
                             f"fewer than batch size {batch_size}; lower --batch-size or --context-length, or give more data")  # fmt: skip
        self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.shard, self.window = 0, 0, 0  # the next window: `window` of the epoch's `shard`-th shard
        self._orders: dict = {}

    @property
    def batches_per_epoch(self) -> int:
        return len(self.windows) // self.batch_size

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.windows.shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def window_order(self, epoch: int, shard: int) -> np.ndarray:
        """The order of shard `shard`'s windows in epoch `epoch` (indices within the shard)."""
        key = (epoch, shard)
        if key not in self._orders:
            n = int(self.windows.counts[shard])
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {key: order.astype(np.uint32 if n < 2**32 else np.int64)}  # one shard's order at a time
        return self._orders[key]

    def _take(self, n: int) -> np.ndarray:
        """The next n window indices (global), advancing the position."""
        out = []
        while n:
            order = self.shard_order(self.epoch)
            if self.shard == len(order):
                self.epoch, self.shard, self.window = self.epoch + 1, 0, 0
                continue
            s = int(order[self.shard])
            count = int(self.windows.counts[s])
            k = min(n, count - self.window)
            if k > 0:
                out.append(self.windows.first[s] + self.window_order(self.epoch, s)[self.window : self.window + k].astype(np.int64))
                self.window += k
                n -= k
            if self.window >= count:
                self.shard, self.window = self.shard + 1, 0
        return np.concatenate(out)

    def next_indices(self) -> np.ndarray:
        """This rank's window indices of the next global batch (B / W of them), advancing the position."""
        indices = self._take(self.batch_size)  # (B,) the global batch
        share = self.batch_size // self.world_size
        return indices[self.rank * share : (self.rank + 1) * share]  # (B/W,)

    def next(self):
        """(inputs, targets), each (B/W, T) int64: this rank's rows of the next global batch."""
        return self.windows.batch(self.next_indices())

    def state(self) -> dict:
        """The position, JSON-able: enough for `restore` to continue exactly."""
        return {"kind": "shard windows", "epoch": self.epoch, "shard": self.shard, "window": self.window,
                "seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size,
                "windows": len(self.windows), "fingerprint": self.windows.fingerprint()}  # fmt: skip

    def restore(self, state: dict) -> None:
        if state.get("kind") != "shard windows":
            raise ValueError("the saved data position is not one of token shards; resume with the --data the run started with")
        if state.get("fingerprint") != self.windows.fingerprint() or state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"the saved data position is for {state.get('windows')} windows in batches of {state.get('batch_size')}, "
                f"but this run has {len(self.windows)} windows in batches of {self.batch_size} (or other shards); resume "
                "with the same --data, --context-length, --stride and --batch-size"
            )
        self.epoch, self.shard, self.window = int(state["epoch"]), int(state["shard"]), int(state["window"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._orders = {}

    # the names npgpt.data.Batches uses, so the training loop can hold either
    state_dict = state
    load_state_dict = restore


def shard_batches(specs, context_length: int, batch_size: int, seed: int = 0, stride: int | None = None,
                  data_format: str = "auto", rank: int = 0, world_size: int = 1):  # fmt: skip
    """What a training run needs from token shards, in one call: (the sampler of training batches, the
    validation windows or None when there are no validation shards, the ShardSet for the banner).

        sampler, val, shards = shard_batches(cfg.data, T, cfg.batch_size, cfg.seed, cfg.stride,
                                             cfg.data_format, world.rank, world.size)
    """
    from .shards import find_shards

    shards = find_shards(specs, data_format)
    train = ShardWindows(shards.train, context_length, stride, name="train")
    val = ShardWindows(shards.val, context_length, stride, name="validation") if shards.val else None
    return WindowSampler(train, batch_size, seed=seed, rank=rank, world_size=world_size), val, shards
