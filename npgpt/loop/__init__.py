"""One run loop for every training task: pretraining (npgpt/train.py), classification and instruction
tuning (npgpt/finetune/), translation (npgpt/seq2seq/train.py).

    task = Pretraining(cfg)      # a task reads and checks everything (settings, data, checkpoint, memory)
    result = run_task(task, task.loop_settings(), task.resume_dir, task.resume_state)

Modules: run.py (the loop, and what a task supplies), folder.py (the run's folder: checkpoints,
metrics.jsonl, summary.json, --resume and --overwrite), stop.py (SIGINT / SIGTERM), batches.py (the batch
position a checkpoint saves), errors.py (how a run that goes wrong ends). docs/architecture.md draws it.
"""

from .batches import PositionedBatches
from .errors import SaveFailed, TrainingAborted, TrainingInterrupted
from .folder import RunFolder, find_resume
from .run import At, Loop, LoopSettings, Report, StepResult, run_task, step_rng, weights_not_finite
from .stop import StopRequest

__all__ = ["At", "Loop", "LoopSettings", "PositionedBatches", "Report", "RunFolder", "SaveFailed", "StepResult",
           "StopRequest", "TrainingAborted", "TrainingInterrupted", "find_resume", "run_task",
           "step_rng", "weights_not_finite"]  # fmt: skip
