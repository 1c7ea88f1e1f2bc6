"""Finite-difference gradient checking for any forward/backward pair, npgpt's or your own.

The contract checked is npgpt's layer contract:

    out, cache = forward(*inputs)
    grads      = backward(dout, cache)   # one gradient per differentiable input, in input order
                                         # (a single array when there is one)

How `gradcheck` tests it:
1. Every floating-point input is copied to float64 NumPy (inputs may also be dicts of arrays,
   like a block's parameters; integers and other values pass through untouched).
2. A random upstream gradient `dout` ~ N(0, 1) with the output's shape (never all ones: a sum of
   ones hides bugs such as a softmax backward that forgets a term) defines the scalar
   L(inputs) = sum(forward(inputs)[0] * dout), whose gradient is exactly what backward returns.
3. For every differentiable input, on all coordinates (a tensor of at most `max_coords` entries) or
   on a design that perturbs every index of every axis at least once (a larger one: see
   `sample_coordinates`; "checked 65/96, axes" in the table), the central difference
   (L(x + eps e_i) - L(x - eps e_i)) / (2 eps) is compared with the analytic gradient by
       rel_error = max_i |a_i - n_i| / max(max_i (|a_i| + |n_i|), tiny)
   a tensor-wide relative error that is not fooled by entries that are (nearly) zero. A backward
   that is wrong on one slice (one time step, one head, one channel, one batch row, the last column)
   is therefore caught whatever the seed.
4. It also checks that backward returned the right number and shapes of gradients, in the inputs'
   order (gradients returned in another order are named as such), and did not modify dout or
   anything in the cache.
5. Before any of that, forward runs twice on the unperturbed inputs: finite differences of a forward
   that draws fresh random numbers on every call (a dropout mask from a global generator, or from a
   Generator passed as an input) measure the randomness, not the gradient, so such a forward is
   refused with a ValueError saying how to make it deterministic.

`compare_backends` runs the same pair on NumPy and CuPy and compares the outputs and gradients
(on a GPU, float32 results are checked against NumPy, not against finite differences).

Example, a layer of your own:

    def swish_forward(x):
        s = 1 / (1 + np.exp(-x))
        return x * s, (x, s)
    def swish_backward(dout, cache):
        x, s = cache
        return dout * (s + x * s * (1 - s))
    results = npgpt.gradcheck(swish_forward, swish_backward, [np.random.randn(4, 5)])
    print(npgpt.format_results(results))

In a test suite, `npgpt.assert_gradients(swish_forward, swish_backward, [x])` does the same in one
call and raises AssertionError with the table when a gradient is wrong.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .backend import get_array_module, is_cupy_array, to_numpy

TINY = 1e-30


@dataclass
class GradcheckResult:
    """One compared tensor: a gradient (or, in compare_backends, an output)."""

    layer: str
    input: str
    max_rel_error: float
    tol: float
    passed: bool
    n_checked: int = 0  # coordinates compared
    n_total: int = 0  # coordinates in the tensor
    worst_index: tuple | None = None  # where |analytic - numeric| is largest
    analytic: float = float("nan")  # analytic value there
    numeric: float = float("nan")  # reference value there (finite difference, or NumPy)
    note: str = ""  # why it failed when no number tells (wrong shape, mutated cache, exception)
    coverage: str = ""  # "all": every coordinate; "axes": every index of every axis (sample_coordinates)

    def describe(self) -> str:
        where = "" if self.worst_index is None else f" at {self.worst_index}: analytic {self.analytic:.6g} vs reference {self.numeric:.6g}"
        status = "ok" if self.passed else "FAILED"
        note = f" ({self.note})" if self.note else ""
        return f"{self.layer} d{self.input}: rel error {self.max_rel_error:.2e} (tol {self.tol:.0e}) {status}{where}{note}"


def relative_error(analytic, numeric, tiny: float = TINY) -> float:
    """max|a - n| / max(max(|a| + |n|), tiny) over all entries (0 for empty arrays)."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.size == 0:
        return 0.0
    num = np.max(np.abs(a - n))
    den = max(float(np.max(np.abs(a) + np.abs(n))), tiny)
    return float(num / den)


# ---------------------------------------------------------------------------------------------
# Inputs may be arrays, dicts of arrays (e.g. a block's parameters), or anything else (ints, None).


def _is_float_array(a) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape") and a.dtype.kind == "f"


def _is_differentiable(a) -> bool:
    if isinstance(a, dict):
        return len(a) > 0 and all(_is_float_array(v) for v in a.values())
    return _is_float_array(a)


def _leaves(value, name: str):
    """[(name, array)] for an array or a dict of arrays."""
    if isinstance(value, dict):
        return [(f"{name}[{k}]", v) for k, v in value.items()]
    return [(name, value)]


def _to_float64_numpy(value):
    if isinstance(value, dict):
        return {k: _to_float64_numpy(v) for k, v in value.items()}
    if _is_float_array(value):
        return np.array(to_numpy(value), dtype=np.float64)  # a private copy we may perturb
    if is_cupy_array(value):
        return to_numpy(value)
    return value


def _snapshot(obj, out: list) -> list:
    """Copies of every array reachable in a cache (NamedTuples, tuples, lists, dicts)."""
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):
        out.append((obj, to_numpy(obj).copy()))
    elif isinstance(obj, dict):
        for v in obj.values():
            _snapshot(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _snapshot(v, out)
    return out


def _unchanged(snapshot) -> bool:
    return all(np.array_equal(to_numpy(a), copy, equal_nan=True) for a, copy in snapshot)


def _input_names(forward: Callable, n: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        params = []
    names = params[:n]
    names += [f"input{i}" for i in range(len(names), n)]
    return names


def _signature(value):
    """What a gradient must look like to fit an input: its shape, or a dict input's keys and shapes."""
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    if value is None or not hasattr(value, "shape"):
        return None
    return tuple(value.shape)


def _order_note(wanted: str, fits: str) -> str:
    return f"gradients appear to be in a different order than the inputs ({wanted}); {fits}"


def _permuted_order(grads, inputs, wrt, names) -> str | None:
    """If the returned gradients fit the inputs' shapes only in another order, say which order."""
    want = [_signature(inputs[i]) for i in wrt]
    got = [_signature(g) for g in grads]
    if got == want or None in got or sorted(map(repr, got)) != sorted(map(repr, want)):
        return None
    unused = list(wrt)
    fitted = []
    for sig in got:  # each returned gradient is given the first unused input of its shape
        i = next(i for i in unused if _signature(inputs[i]) == sig)
        unused.remove(i)
        fitted.append(names[i])
    shapes = ", ".join(str(sig) if not isinstance(grads[k], dict) else "{dict}" for k, sig in enumerate(got))
    wanted = ", ".join(names[i] for i in wrt)
    return _order_note(wanted, f"the shapes returned, {shapes}, fit ({', '.join(fitted)}); return ({wanted})")


def _match_grads(grads, inputs, wrt, names):
    """Pair each differentiable input's leaves with the backward's gradients.

    Returns [(name, input array, gradient, problem)], problem being "" or why that gradient cannot be
    compared (wrong shape, missing). Raises _Mismatch when nothing can be paired: a wrong number of
    gradients, a dict where an array belongs (or the reverse), or gradients returned in another order.
    """
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    wanted = ", ".join(names[i] for i in wrt)
    if len(grads) != len(wrt):
        raise _Mismatch(f"backward returned {len(grads)} gradients but the differentiable inputs are ({wanted})")
    order = _permuted_order(grads, inputs, wrt, names)
    if order:
        raise _Mismatch(order)
    pairs = []
    for g, i in zip(grads, wrt):
        x = inputs[i]
        if isinstance(x, dict):
            if not isinstance(g, dict):
                raise _Mismatch(f"the gradient of {names[i]} must be a dict with the same keys")
            extra = sorted(set(g) - set(x))
            if extra:
                raise _Mismatch(f"gradient of {names[i]} has unknown keys {extra}")
            pairs += [(f"{names[i]}[{k}]", v, g.get(k)) for k, v in x.items()]
        else:
            pairs.append((names[i], x, g))
    result = []
    for name, x, g in pairs:
        problem = ""
        if g is None:
            problem = f"gradient of {name} is missing"
        elif not hasattr(g, "shape") or tuple(g.shape) != tuple(x.shape):
            got = tuple(g.shape) if hasattr(g, "shape") else type(g).__name__
            problem = f"gradient of {name} has shape {got}, expected {tuple(x.shape)}"
        result.append((name, x, g, problem))
    return result


class _Mismatch(ValueError):
    """The gradients cannot be paired with the inputs at all."""


def _fail_all(layer, inputs, wrt, names, tol, note) -> list[GradcheckResult]:
    """One failed result per differentiable tensor, all with the same note (backward crashed or mismatched)."""
    return [
        GradcheckResult(layer, leaf, float("inf"), tol, False, 0, int(np.size(x)), note=note)
        for i in wrt
        for leaf, x in _leaves(inputs[i], names[i])
    ]


def gradcheck(
    forward: Callable,
    backward: Callable,
    inputs: Sequence[Any],
    *,
    wrt: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    layer: str | None = None,
    eps: float = 1e-5,
    tol: float = 1e-7,
    max_coords: int = 64,
    seed: int = 0,
) -> list[GradcheckResult]:
    """Check `backward` against central finite differences of `forward`, in float64 on NumPy.

    forward(*inputs) -> (out, cache); backward(dout, cache) -> gradients of inputs[wrt], in order.
    wrt: indices of the differentiable inputs (default: every float array or dict of float arrays).
    names: one per input (default: forward's parameter names). eps: finite-difference step.
    tol: largest accepted relative error. max_coords: a tensor of at most this many entries is checked
    at every one; a larger one at max(max_coords, longest axis) coordinates that perturb every index of
    every axis at least once, plus the largest analytic gradient (`sample_coordinates`).
    seed: draws dout and the coordinates.
    Returns one GradcheckResult per differentiable tensor (a dict input gives one per key).
    Raises ValueError when forward is not deterministic (two calls on the same inputs differ).
    """
    layer = layer or getattr(forward, "__name__", "layer").removesuffix("_forward")
    inputs = [_to_float64_numpy(x) for x in inputs]
    names = list(names) if names is not None else _input_names(forward, len(inputs))
    if len(names) != len(inputs):
        raise ValueError(f"gradcheck: {len(names)} names for {len(inputs)} inputs")
    wrt = _differentiable(inputs, names, wrt)

    rng = np.random.default_rng(seed)

    def output() -> np.ndarray:  # a private float64 copy: forward may return the same buffer every call
        return np.array(to_numpy(forward(*inputs)[0]), dtype=np.float64, order="C")

    first = output()
    out, cache = forward(*inputs)
    out = np.array(to_numpy(out), dtype=np.float64, order="C")
    _require_deterministic(layer, first, out)
    dout = rng.standard_normal(out.shape)  # the finite differences use this pristine copy
    dout_given = dout.copy()  # what backward receives (and must not modify)
    snapshot = _snapshot(cache, [])

    try:
        grads = backward(dout_given, cache)
        pairs = _match_grads(grads, inputs, wrt, names)
    except _Mismatch as e:
        return _fail_all(layer, inputs, wrt, names, tol, str(e))
    except Exception as e:  # a crashing backward is a failed check, reported like one
        return _fail_all(layer, inputs, wrt, names, tol, f"backward raised {type(e).__name__}: {e}")
    purity = []
    if not np.array_equal(dout_given, dout):
        purity.append("backward modified dout")
    if not _unchanged(snapshot):
        purity.append("backward modified its cache")

    dout_flat = dout.ravel()

    def loss_change(plus: np.ndarray, minus: np.ndarray) -> float:
        """L(x + eps e_i) - L(x - eps e_i) = sum((out+ - out-) * dout): the outputs are subtracted
        first, so no digits are lost to the size of L itself."""
        return float(np.dot((plus - minus).ravel(), dout_flat))

    results, compared = [], []  # compared: (gradient, coordinates, finite differences) per checked tensor
    for name, x, g, problem in pairs:
        if problem:
            results.append(GradcheckResult(layer, name, float("inf"), tol, False, 0, x.size, note=problem))
            compared.append(None)
            continue
        result, seen = _check_tensor(layer, name, x, g, output, loss_change, rng, eps, tol, max_coords, purity)
        results.append(result)
        compared.append(seen)
    _note_swapped(results, compared, [p[0] for p in pairs], ", ".join(names[i] for i in wrt))
    return results


def _differentiable(inputs, names, wrt) -> list[int]:
    """The indices of the inputs to check: `wrt`, or every float array (or dict of them)."""
    if wrt is None:
        wrt = [i for i, x in enumerate(inputs) if _is_differentiable(x)]
    wrt = list(wrt)
    for i in wrt:
        if not _is_differentiable(inputs[i]):
            raise ValueError(f"gradcheck: input {names[i]} (index {i}) is not a float array or a dict of float arrays")
    if not wrt:
        raise ValueError("gradcheck: no differentiable inputs (float arrays) to check")
    return wrt


def _require_deterministic(layer: str, first: np.ndarray, second: np.ndarray) -> None:
    """Finite differences need L(x) to be a function of x: the same inputs must give the same output."""
    if first.shape == second.shape and np.array_equal(first, second, equal_nan=True):
        return
    diff = "different shapes" if first.shape != second.shape else f"max difference {np.max(np.abs(first - second)):.3g}"
    raise ValueError(
        f"gradcheck: {layer}'s forward is not deterministic: two calls on the same inputs returned different outputs "
        f"({diff}), so finite differences would measure its randomness, not its gradient; make it repeatable: "
        "create its generator from a fixed seed inside the forward (rng = np.random.default_rng(0) on every call) "
        "or pass the random mask in as an input"
    )


def sample_coordinates(shape, g, rng: np.random.Generator, max_coords: int = 64) -> tuple[np.ndarray, str]:
    """Flat indices of the coordinates to perturb in a tensor of `shape`, and what they cover.

    - At most `max_coords` entries: every one ("all").
    - More: a Latin-square-like design ("axes"). With m = the longest axis, row j of the design is the
      coordinate (p_0[j], p_1[j], ...), where p_a lists axis a's indices in random order, repeated
      until it is m long. Each index of each axis thus appears at least once (and an axis of length d
      about m/d times), so a backward wrong on one slice (one time step, one head, one channel, one
      batch row, one column) is perturbed there whatever the seed. Rows are distinct: the longest axis
      is one permutation. Random further coordinates fill the design up to `max_coords`, and the
      coordinate of the largest |g| (the analytic gradient) is added when missing.

    A bug confined to a few entries that are not a whole slice (one (b, t) pair, say) is only found
    when one of them is drawn or holds the largest gradient.
    """
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if n <= max_coords or not shape:
        return np.arange(n), "all"
    m = max(shape)
    axes = [np.concatenate([rng.permutation(d) for _ in range(-(-m // d))])[:m] for d in shape]
    design = np.ravel_multi_index(axes, shape)  # (m,) distinct flat indices
    extra = max_coords - m
    if extra > 0:
        others = np.setdiff1d(np.arange(n), design)
        design = np.concatenate([design, rng.choice(others, size=extra, replace=False)])
    largest = int(np.argmax(np.abs(np.asarray(g).reshape(-1))))
    return np.union1d(design, [largest]), "axes"


def _check_tensor(layer, name, x, g, output, loss_change, rng, eps, tol, max_coords, purity) -> tuple[GradcheckResult, tuple]:
    """Central differences at the coordinates of `sample_coordinates` against the analytic gradient g
    -> (result, (g, coordinates, finite differences))."""
    g = np.asarray(to_numpy(g), dtype=np.float64)
    flat_x = x.reshape(-1)  # a view: perturbing it perturbs the input
    coords, coverage = sample_coordinates(x.shape, g, rng, max_coords)
    numeric = np.empty(len(coords))
    for j, c in enumerate(coords):
        orig = flat_x[c]
        flat_x[c] = orig + eps
        plus = output()
        flat_x[c] = orig - eps
        minus = output()
        flat_x[c] = orig
        numeric[j] = loss_change(plus, minus) / (2 * eps)
    analytic = g.reshape(-1)[coords]
    err = relative_error(analytic, numeric)
    worst = int(np.argmax(np.abs(analytic - numeric))) if len(coords) else 0
    passed = err <= tol and not purity
    result = GradcheckResult(
        layer, name, err, tol, passed, len(coords), x.size,
        worst_index=tuple(int(v) for v in np.unravel_index(coords[worst], x.shape)) if len(coords) else None,
        analytic=float(analytic[worst]) if len(coords) else float("nan"),
        numeric=float(numeric[worst]) if len(coords) else float("nan"),
        note="; ".join(purity), coverage=coverage,
    )  # fmt: skip
    return result, (g, coords, numeric)


def _note_swapped(results, compared, leaf_names, wanted) -> None:
    """Gradients of equal shapes returned in each other's places fail on their numbers alone; when every
    failing gradient matches the finite differences of another tensor of its shape, say so."""
    failing = [k for k, r in enumerate(results) if compared[k] is not None and r.max_rel_error > r.tol]
    if not failing:
        return
    found = {}
    for k in failing:
        _, coords, numeric = compared[k]
        for j, other in enumerate(compared):
            if j != k and other is not None and other[0].shape == compared[k][0].shape:
                if relative_error(other[0].reshape(-1)[coords], numeric) <= results[k].tol:
                    found[k] = j
                    break
    if len(found) < len(failing):
        return
    for k, j in found.items():
        fits = f"the gradient returned for {leaf_names[j]} matches the finite differences of {leaf_names[k]}"
        results[k].note = "; ".join(filter(None, [_order_note(wanted, fits), results[k].note]))


class HostRandom:
    """A NumPy Generator whose draws are placed on `xp`'s device.

    NumPy and CuPy generators give different streams for the same seed; passing HostRandom(seed, xp)
    as `rng` makes a NumPy run and a CuPy run draw identical dropout masks, so they can be compared.
    """

    def __init__(self, seed, xp=np):
        self._gen = np.random.default_rng(seed)
        self._xp = xp

    def random(self, size=None, dtype=np.float32):
        return self._xp.asarray(self._gen.random(size, dtype=np.dtype(dtype).type))

    def standard_normal(self, size=None, dtype=np.float32):
        return self._xp.asarray(self._gen.standard_normal(size, dtype=np.dtype(dtype).type))


def _to_xp(value, xp, dtype):
    if isinstance(value, dict):
        return {k: _to_xp(v, xp, dtype) for k, v in value.items()}
    if _is_float_array(value):
        return xp.asarray(to_numpy(value), dtype=dtype)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return xp.asarray(to_numpy(value))
    return value


def compare_backends(
    forward: Callable,
    backward: Callable,
    inputs: Sequence[Any],
    *,
    xp=None,
    dtype=np.float32,
    names: Sequence[str] | None = None,
    layer: str | None = None,
    tol: float | None = None,
    seed: int = 0,
) -> list[GradcheckResult]:
    """Run forward and backward on NumPy and on `xp` (CuPy by default) with identical inputs and dout;
    compare the outputs and every gradient with `relative_error`.

    forward may take a keyword `xp` if it needs to build device-specific things (e.g. an rng); it is
    passed when forward's signature has it. tol defaults to 1e-5 in float32 and 1e-12 in float64.
    """
    if xp is None:
        import cupy as xp  # noqa: F811  (only reached when a GPU check is asked for)
    dtype = np.dtype(dtype)
    tol = tol if tol is not None else (1e-5 if dtype == np.float32 else 1e-12)
    layer = layer or getattr(forward, "__name__", "layer").removesuffix("_forward")
    names = list(names) if names is not None else _input_names(forward, len(inputs))
    wrt = [i for i, x in enumerate(inputs) if _is_differentiable(x)]
    takes_xp = "xp" in inspect.signature(forward).parameters

    def run(mod):
        args = [_to_xp(x, mod, dtype) for x in inputs]
        out, cache = forward(*args, xp=mod) if takes_xp else forward(*args)
        dout = mod.asarray(np.random.default_rng(seed).standard_normal(out.shape), dtype=out.dtype)
        grads = backward(dout, cache)
        if get_array_module(out) is not mod:
            raise ValueError(f"{layer}: forward on {mod.__name__} arrays returned a {type(out).__module__} array")
        pairs = _match_grads(grads, args, wrt, names)
        problems = [problem for *_, problem in pairs if problem]
        if problems:
            raise ValueError(f"{layer}: " + "; ".join(problems))
        return out, [pair[:3] for pair in pairs]

    ref_out, ref_pairs = run(np)
    dev_out, dev_pairs = run(xp)
    results = []
    for (name, _, ref), (_, _, dev) in [(("out", None, ref_out), ("out", None, dev_out))] + list(zip(ref_pairs, dev_pairs)):
        ref_np, dev_np = to_numpy(ref), to_numpy(dev)
        err = relative_error(dev_np, ref_np)
        diff = np.abs(dev_np.astype(np.float64) - ref_np.astype(np.float64))
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else None
        results.append(
            GradcheckResult(
                layer, name, err, tol, bool(err <= tol), diff.size, diff.size,
                worst_index=None if worst is None else tuple(int(v) for v in worst),
                analytic=float(dev_np[worst]) if worst is not None else float("nan"),
                numeric=float(ref_np[worst]) if worst is not None else float("nan"),
                note=f"{xp.__name__} vs numpy, {dtype.name}", coverage="all",
            )
        )  # fmt: skip
    return results


COVERAGE_LEGEND = {  # printed under a table that has such a row ("all" needs no explaining)
    "axes": "every index of every axis perturbed at least once, and the largest gradient entry (not every entry)",
}


def format_results(results: Sequence[GradcheckResult]) -> str:
    """A plain-text table: layer, input, coordinates checked, what they cover, max relative error,
    tolerance, pass/fail.

    "checked 65/96" means 65 of the tensor's 96 coordinates were perturbed; "covers" says which: "all",
    or "axes" (every index of every axis at least once, plus the largest analytic gradient; see
    `sample_coordinates`), which a line under the table explains. compare_backends compares every
    entry. Failures are explained below the table, one line each.
    """
    header = ("layer", "input", "checked", "covers", "max rel error", "tol", "result")
    rows = [
        (r.layer, "d" + r.input, f"{r.n_checked}/{r.n_total}", r.coverage or "-", f"{r.max_rel_error:.2e}",
         f"{r.tol:.0e}", "pass" if r.passed else "FAIL")
        for r in results
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    used = list(dict.fromkeys(r.coverage for r in results if r.coverage in COVERAGE_LEGEND))  # in table order
    if used:
        out.append("")
        out += [f"covers {c}: {COVERAGE_LEGEND[c]}" for c in used]
    failures = [r for r in results if not r.passed]
    if failures:
        out.append("")
        out += [r.describe() for r in failures]
    return "\n".join(out)


def assert_gradients(forward: Callable, backward: Callable, inputs: Sequence[Any], **kwargs) -> list[GradcheckResult]:
    """`gradcheck` as one assertion, for test suites: raises AssertionError carrying the table if any
    gradient fails, else returns the results. Keyword arguments go to `gradcheck` (wrt, names, layer,
    eps, tol, max_coords, seed).

        def test_swish():
            npgpt.assert_gradients(swish_forward, swish_backward, [np.random.randn(4, 5)])
    """
    results = gradcheck(forward, backward, inputs, **kwargs)
    failed = [r for r in results if not r.passed]
    if failed:
        raise AssertionError(
            f"{len(failed)} of {len(results)} gradients disagree with finite differences\n{format_results(results)}"
        )
    return results


@dataclass
class Check:
    """A named forward/backward pair with inputs, for suites like `npgpt gradcheck`."""

    layer: str
    forward: Callable
    backward: Callable
    make_inputs: Callable[[np.random.Generator], list]
    tol: float = 1e-7
    eps: float = 1e-5
    max_coords: int = 64
    names: list[str] | None = None

    def run(self, seed: int = 0) -> list[GradcheckResult]:
        rng = np.random.default_rng(seed)
        return gradcheck(
            self.forward, self.backward, self.make_inputs(rng), names=self.names, layer=self.layer,
            eps=self.eps, tol=self.tol, max_coords=self.max_coords, seed=seed,
        )  # fmt: skip

    def run_on(self, xp, dtype=np.float32, seed: int = 0) -> list[GradcheckResult]:
        rng = np.random.default_rng(seed)
        return compare_backends(
            self.forward, self.backward, self.make_inputs(rng), xp=xp, dtype=dtype,
            names=self.names, layer=self.layer, seed=seed,
        )  # fmt: skip
