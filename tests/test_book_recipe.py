"""The options of the book's chapter-5 run (issue 18): weight decay on every parameter, the train loss
evaluated with dropout off, evaluations counted from the first step, the character split, --init through
`npgpt train`, and the recipe that sets them all (flags given beside it win). Tiny models, a few steps."""

import json
import math

import numpy as np
import pytest

from npgpt.cli import build_parser, main
from npgpt.cli.train import config_from_args
from npgpt.data import bundled_path, read_text, split_text_ids
from npgpt.model import GPT
from npgpt.optim import AdamW, decay_every_parameter
from npgpt.recipes import RECIPES, recipe_config
from npgpt.tokenizer import encode
from npgpt.train import Pretraining, TrainConfig, train

TINY = dict(preset="nano", emb_dim=32, n_heads=2, n_layers=1, context_length=32, batch_size=2, progress=False,
            sample_tokens=3)  # fmt: skip


# --- weight decay on every parameter ------------------------------------------------------------------


def test_adamw_decaying_every_parameter_equals_torch_adamw_on_model_parameters():
    """npgpt's AdamW with decay_every_parameter against torch.optim.AdamW(all params, weight_decay=0.1)
    over three steps, 1-D tensors (biases, LayerNorm) included: the same weights to float64 rounding."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 4)), "b": rng.standard_normal(4), "ln.weight": 1 + 0.1 * rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(3)]
    ours = {k: v.copy() for k, v in params.items()}
    opt = AdamW(ours, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decay_filter=decay_every_parameter)
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    topt = torch.optim.AdamW(list(theirs.values()), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for g in grads:
        opt.step(g)
        for k, t in theirs.items():
            t.grad = torch.tensor(g[k])
        topt.step()
    assert all(opt.decay.values())
    for k in params:
        err = np.max(np.abs(ours[k] - theirs[k].detach().numpy()))
        assert err < 1e-12, (k, err)
        assert not np.allclose(ours[k], params[k])


def test_decay_on_every_parameter_with_zero_gradients_is_the_closed_form():
    """With zero gradients Adam's term is 0, so one step leaves p (1 - lr wd) for every tensor under "all",
    and only the ndim >= 2 ones shrink under the default "matrices"."""
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2), "ln.bias": rng.standard_normal(2)}
    zeros = {k: np.zeros_like(p) for k, p in params.items()}
    lr, wd = 0.01, 0.3
    every = {k: p.copy() for k, p in params.items()}
    AdamW(every, lr=lr, weight_decay=wd, decay_filter=decay_every_parameter).step(zeros)
    default = {k: p.copy() for k, p in params.items()}
    AdamW(default, lr=lr, weight_decay=wd).step(zeros)
    for k, p in params.items():
        np.testing.assert_allclose(every[k], p * (1 - lr * wd), rtol=1e-15, atol=0)
        np.testing.assert_array_equal(default[k], p * (1 - lr * wd) if p.ndim >= 2 else p)


def test_train_weight_decay_on_all_decays_biases_and_layernorm(tmp_path):
    """One training step with --weight-decay-on all against the same step with the default: the gradients of
    the first step do not depend on the decay, so every 1-D tensor differs by exactly lr * wd * p0 and every
    matrix is the same (it is decayed either way)."""
    lr, wd = 1e-3, 0.5
    kw = dict(TINY, max_steps=1, lr=lr, weight_decay=wd, schedule="constant", grad_clip=None, eval_interval=100,
              init="pytorch")  # fmt: skip
    runs = {}
    for on in ("matrices", "all"):
        t = Pretraining(TrainConfig(**kw, weight_decay_on=on, out_dir=str(tmp_path / on)))
        start = {k: v.copy() for k, v in t.model.params.items()}
        t.train_step(1)  # the step itself (no evaluation, no checkpoint)
        runs[on] = (start, t.model.params, t.optimizer.decay)
    (s0, p_mat, d_mat), (s1, p_all, d_all) = runs["matrices"], runs["all"]
    assert all(d_all.values()) and not all(d_mat.values())
    one_d = [k for k, v in s0.items() if v.ndim == 1]
    assert {"ln_f.bias", "h.0.ln_1.weight", "h.0.mlp.c_fc.bias"} <= set(one_d)
    for k, p0 in s0.items():
        np.testing.assert_array_equal(p0, s1[k])  # the same start
        if p0.ndim == 1:
            np.testing.assert_allclose(p_mat[k] - p_all[k], lr * wd * p0, rtol=1e-3, atol=1e-7)
        else:
            np.testing.assert_array_equal(p_mat[k], p_all[k])


def test_resume_refuses_another_weight_decay_on(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, max_steps=2, weight_decay_on="all", out_dir=str(out)))
    assert main(["train", "--max-steps", "4", "--out-dir", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--weight-decay-on matrices cannot be honoured by --resume" in err and "--weight-decay-on all" in err
    r = train(TrainConfig(**TINY, max_steps=4, weight_decay_on="all", out_dir=str(out), resume=True))
    assert r.steps == 4


# --- the train loss evaluated with dropout off ------------------------------------------------------


def test_evaluated_train_loss_runs_without_dropout(tmp_path):
    """With dropout 0.5 the evaluated train loss is the same twice and equals a forward of a dropout-0
    copy of the model (the readable reference) on the windows it names; a training-mode forward differs."""
    t = Pretraining(TrainConfig(**TINY, drop_rate=0.5, eval_train_batches=3, max_steps=4, out_dir=str(tmp_path / "r")))
    first, second = t.evaluate_train(0), t.evaluate_train(0)
    assert first == second
    windows = t.eval_train_windows(0)
    assert len(windows) == 3 * 2 and len(set(windows.tolist())) == 6
    no_dropout = GPT(t.model.config.replace(drop_rate=0.0), params=t.model.params)
    x, y = t.train_windows.batch(windows)
    _, expected, _ = no_dropout.forward(x, y)
    assert abs(first - float(expected)) < 1e-5 * abs(first)
    _, with_dropout, _ = t.model.forward(x, y, training=True, rng=np.random.default_rng(0))
    assert abs(float(with_dropout) - first) > 1e-3


def test_evaluated_train_loss_is_logged_and_plotted_apart_from_the_running_mean(tmp_path):
    out = tmp_path / "run"
    r = train(TrainConfig(**TINY, drop_rate=0.3, lr=1e-2, eval_train_batches=2, eval_interval=3, eval_offset=1,
                          max_steps=8, out_dir=str(out)))  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in records if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [1, 4, 7, 8]  # from the first step, every 3, and the last
    steps = {e["step"]: e["loss"] for e in records if e["kind"] == "step"}
    for e in evals:
        assert math.isfinite(e["train_eval_loss"]) and e["train_eval_loss"] != e["train_loss"]
    assert evals[0]["train_loss"] == steps[1]  # the running mean after one step is that step's loss
    assert r.train_eval_loss == evals[-1]["train_eval_loss"] and r.train_loss == evals[-1]["train_loss"]
    state = json.loads(next(out.glob("checkpoints/step-*/trainer_state.json")).read_text())
    assert [row[0] for row in state["history"]["train_eval"]] == [1, 4, 7, 8]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_labels_the_evaluated_train_loss_distinctly(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from npgpt.metrics import plot_losses

    labels = []
    real_savefig = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: (labels.extend(
        line.get_label() for ax in fig.axes for line in ax.get_lines()), real_savefig(fig, *a, **k))[1])  # fmt: skip
    plot_losses({"train": [(1, 10, 5.0)], "val": [(1, 10, 6.0)], "train_eval": [(1, 10, 4.0)]}, tmp_path / "p.png")
    train_labels = [lb for lb in labels if lb.startswith("train")]
    assert len(train_labels) == 2 and "dropout off" in " ".join(train_labels) and "mean" in " ".join(train_labels)


# --- the character split, --init through train ----------------------------------------------------


def test_character_split_is_the_books():
    text = read_text(bundled_path("the-verdict"))
    train_ids, val_ids = split_text_ids([text], 0.9)
    cut = int(0.9 * len(text))
    assert train_ids.tolist() == encode(text[:cut]) and val_ids.tolist() == encode(text[cut:])
    assert (len(train_ids), len(val_ids)) == (4612, 534)  # 18 windows of 256 (9 batches of 2) and 2
    a, b = split_text_ids(["abcd", "efgh"], 0.75)  # the cut in the second text: "abcd" + "ef" | "gh"
    assert a.tolist() == encode("abcd") + [50256] + encode("ef") and b.tolist() == encode("gh")


def test_train_init_pytorch_and_its_refusals(tmp_path, capsys):
    t = Pretraining(TrainConfig(**TINY, init="pytorch", max_steps=1, out_dir=str(tmp_path / "a")))
    assert abs(float(t.model.params["wte.weight"].std()) - 1.0) < 0.01  # N(0, 1) embeddings
    bound = 1 / math.sqrt(32 * 4)
    w = t.model.params["h.0.mlp.c_proj.weight"]
    assert np.abs(w).max() <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
    g = Pretraining(TrainConfig(**TINY, max_steps=1, out_dir=str(tmp_path / "b")))
    assert abs(float(g.model.params["wte.weight"].std()) - 0.02) < 0.002  # the default stays GPT-2's
    assert main(["train", "--init", "pytorch", "--init-from", str(tmp_path), "--no-progress"]) == 2
    assert "--init pytorch cannot be combined with --init-from" in capsys.readouterr().err


# --- the recipe -----------------------------------------------------------------------------------


def test_recipe_sets_the_books_choices():
    cfg = recipe_config("book-ch5")
    cfg.validate()
    model = cfg.model_config()
    assert (model.emb_dim, model.n_heads, model.n_layers, model.context_length) == (768, 12, 12, 256)
    assert (model.drop_rate, model.qkv_bias, model.tie_weights) == (0.1, False, False)
    assert (cfg.init, cfg.weight_decay_on, cfg.weight_decay, cfg.lr, cfg.beta1, cfg.beta2) == ("pytorch", "all", 0.1, 4e-4, 0.9, 0.999)
    assert (cfg.schedule, cfg.warmup_steps, cfg.grad_clip, cfg.batch_size, cfg.epochs) == ("constant", 0, None, 2, 10)
    assert (cfg.split_by, cfg.train_ratio, cfg.stride) == ("characters", 0.9, 256)
    assert (cfg.eval_interval, cfg.eval_offset, cfg.eval_train_batches, cfg.sample_prompt) == (5, 1, 5, "Every effort moves you")


def test_flags_given_beside_the_recipe_win_even_when_they_repeat_a_default():
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["train", "--recipe", "book-ch5", "--batch-size", "4", "--lr", "1e-3",
                                  "--weight-decay-on", "matrices", "--grad-clip", "1", "--qkv-bias"]))  # fmt: skip
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay_on, cfg.grad_clip, cfg.qkv_bias) == (4, 1e-3, "matrices", 1.0, True)
    assert cfg.beta2 == 0.999 and cfg.init == "pytorch"  # the rest is the recipe's
    plain = config_from_args(parse(["train", "--batch-size", "4"]))
    assert plain.beta2 == TrainConfig().beta2 and plain.init is None  # no recipe: the defaults
    with_ckpt = config_from_args(parse(["train", "--recipe", "book-ch5", "--init-from", "somewhere"]))
    assert with_ckpt.preset is None and with_ckpt.init is None and with_ckpt.init_from == "somewhere"
    assert set(RECIPES) == {"book-ch5"}


def test_recipe_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--recipe", "book-ch5", "--preset", "nano", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1",
            "--context-length", "32", "--stride", "32", "--max-steps", "6", "--sample-tokens", "3", "--out-dir", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [1, 6]
    assert all(e["sample"].startswith("Every effort moves you") for e in evals)
    state = json.loads(next(out.glob("checkpoints/step-*/trainer_state.json")).read_text())
    assert state["train_config"]["weight_decay_on"] == "all" and state["train_config"]["init"] == "pytorch"
    assert "evaluated without dropout" in capsys.readouterr().out
