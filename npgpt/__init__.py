"""npgpt: GPT-2 in plain NumPy and CuPy, with the backward pass of every layer written by hand.

    import npgpt
    model = npgpt.GPT(npgpt.GPTConfig.from_preset("nano"))
    logits, loss, cache = model.forward(idx, targets, training=True)
    grads = model.backward(cache)
"""

__version__ = "0.1.0"

from .backend import cuda_available, get_array_module, to_numpy
from .config import PRESETS, GPTConfig
from .gradcheck import GradcheckResult, assert_gradients, compare_backends, format_results, gradcheck, relative_error
from .model import GPT
from .optim import AdamW, clip_grad_norm, grad_norm
from .pretrained import load_pretrained
from .schedule import LRSchedule

__all__ = [
    "__version__",
    "GPT", "GPTConfig", "PRESETS", "AdamW", "clip_grad_norm", "grad_norm", "LRSchedule", "load_pretrained",
    "cuda_available", "get_array_module", "to_numpy",
    "gradcheck", "assert_gradients", "compare_backends", "format_results", "relative_error", "GradcheckResult",
]  # fmt: skip
