"""Every gradient of every layer against central finite differences in float64 (relative error < 1e-7),
and the same layers on CuPy against NumPy (skipped without a GPU)."""

import numpy as np
import pytest

from npgpt.gradcheck_suite import layer_checks
from npgpt.model_check import model_checks

from conftest import needs_cuda

LAYER_CHECKS = layer_checks()
MODEL_CHECKS = model_checks()


@pytest.mark.parametrize("check", LAYER_CHECKS, ids=[c.layer for c in LAYER_CHECKS])
def test_layer_gradient(check):
    assert check.tol <= 1e-7
    results = check.run(seed=0)
    assert results, "no tensor was checked"
    for r in results:
        assert r.n_checked > 0
        assert r.passed, r.describe()
        assert r.max_rel_error < 1e-7, r.describe()


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=[c.layer for c in MODEL_CHECKS])
def test_model_gradient(check):
    results = check.run(seed=0)
    names = {r.input for r in results}
    # every parameter tensor of the model is sampled
    assert any("wte.weight" in n for n in names) and any("ln_f.bias" in n for n in names)
    for r in results:
        assert r.n_checked > 0
        assert r.passed, r.describe()
        assert r.max_rel_error < 1e-6, r.describe()


def test_checks_cover_every_layer():
    layers = {c.layer.split()[0] for c in LAYER_CHECKS}
    assert layers == {"embedding", "linear", "layernorm", "gelu", "attention", "cross_entropy", "dropout", "ffn", "block",
                      "last_token", "classifier_head", "mixed_loss"}
    shapes = " ".join(c.layer for c in LAYER_CHECKS)
    assert "B1 T1" in shapes  # the degenerate sizes are covered
    assert {"NH1", "NH2", "NH3", "NH4", "NH8"} <= set(shapes.split())


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("check", LAYER_CHECKS + MODEL_CHECKS, ids=[c.layer for c in LAYER_CHECKS + MODEL_CHECKS])
def test_cupy_matches_numpy(check, dtype):
    import cupy

    for r in check.run_on(cupy, dtype=dtype):
        assert r.passed, r.describe()
