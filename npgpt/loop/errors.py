"""How a run ends when it does not end well: three errors the command line turns into one line each
(npgpt/cli/__init__.py: exit code 1 for TrainingAborted, 130 for TrainingInterrupted, 2 for SaveFailed)."""

from __future__ import annotations


class TrainingAborted(RuntimeError):
    """Training stopped on purpose: it diverged (repeated non-finite steps, weights that are not finite or
    give a non-finite loss); the message says why and names the last good checkpoint. CLI exit code 1."""


class TrainingInterrupted(RuntimeError):
    """A second SIGINT / SIGTERM stopped training at once; the message names the newest checkpoint. CLI
    exit code 130."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, a folder turned read-only); the previous one is
    intact and the message names it. CLI exit code 2."""
