"""The batch source as the loop sees it: a position that is saved in every checkpoint and restored.

    batches = PositionedBatches(Batches(windows, batch_size, seed=0))   # data.Batches, seq2seq's PairBatches
    x, y = batches.next()
    saved = batches.state()        # a small JSON-able dict: trainer_state.json["data"]
    batches.restore(saved)         # the next batch is the one that followed when it was saved

A batch source made for the loop (a sampler with state() and restore() of its own) needs no wrapper.
"""

from __future__ import annotations


class PositionedBatches:
    """A batch source that saves its position with state_dict() / load_state_dict() (data.Batches,
    seq2seq.data.PairBatches), under the loop's names: next(), state(), restore(state)."""

    def __init__(self, source):
        self.source = source
        self.next = source.next  # the batches themselves: no extra call per step

    def state(self) -> dict:
        return self.source.state_dict()

    def restore(self, state: dict) -> None:
        """A position saved by state(); a ValueError when it does not fit this source (other data, another
        batch size), saying what to give."""
        self.source.load_state_dict(state)
