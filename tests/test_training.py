"""Certified training: every method lowers its loss, checkpoints load, resume is exact (also mid-GP)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from cure_lirpa.bounds.classifier import BoundedClassifier
from cure_lirpa.errors import UserError
from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
from cure_lirpa.models import build_model
from cure_lirpa.threats.base import NormBall
from cure_lirpa.training import losses
from cure_lirpa.training.certified import make_ramp, schedule_at, train
from cure_lirpa.training.config import TrainConfig, apply_preset, preset_values
from cure_lirpa.training.objectives import (
    METHODS,
    Batch,
    MethodOptions,
    TrainingNetwork,
    exact_margins,
    make_method,
)
from cure_lirpa.training.timing import step_time

MNIST = ((1, 28, 28), 10, (0.1307,), (0.3081,))


def tiny(**kw) -> TrainConfig:
    """A few-second run: 192 sample images, cnn-small of width 4, batches of 64."""
    kw = {"train_count": 192, "batch_size": 64, "epochs": 3, **kw}
    return tiny_config(kappa=0.0, eps=(0.05, 0.25), **kw)


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# methods


def test_exact_margins_are_the_bounds_at_eps_zero_and_give_cross_entropy():
    torch.manual_seed(0)
    model = build_model("cnn-small", *MNIST, width=4).eval()
    x, y = torch.rand(5, 1, 28, 28), torch.tensor([0, 3, 9, 1, 1])
    logits = model(x)
    m = exact_margins(logits, y)
    lb = BoundedClassifier(model, (1, 28, 28)).margin_lower_bounds(x, y, NormBall(math.inf, 0.0))
    assert torch.allclose(m, lb, atol=1e-4)
    assert torch.allclose(losses.certified_ce(m), F.cross_entropy(logits, y, reduction="none"))


def _net_and_batch(eps_linf=0.05, eps_l2=0.25):
    from cure_lirpa.data import load_dataset, stack, take

    torch.manual_seed(0)
    model = build_model("cnn-small", *MNIST, width=4)
    net = TrainingNetwork(model, (1, 28, 28))
    x, y = stack(take(load_dataset("sample", "train"), 0, 32))
    gen = torch.Generator().manual_seed(0)
    return net, Batch(x, y, {"linf": eps_linf, "l2": eps_l2}, 0.0, 0.0, gen, forward=net.logits)


def test_multi_norm_losses_follow_their_formulas():
    net, batch = _net_and_batch()
    lb_inf = net.ball_bounds(batch.x, batch.y, "linf", 0.05)
    lb_2 = net.ball_bounds(batch.x, batch.y, "l2", 0.25)
    l_inf, l_2 = losses.certified_ce(lb_inf), losses.certified_ce(lb_2)
    joint = make_method("cure-joint", alpha=0.3).step(net, batch)
    assert joint.loss.item() == pytest.approx((0.3 * l_inf.mean() + 0.7 * l_2.mean()).item(), 1e-5)
    mx = make_method("cure-max").step(net, batch)
    assert mx.loss.item() == pytest.approx(torch.maximum(l_inf, l_2).mean().item(), rel=1e-5)
    assert set(mx.certified) == {"linf", "l2"}
    ba = make_method("cure-max", ba_eta=2.0, ba_direction="linf").step(net, batch)
    gamma = (lb_inf > 0).all(1)
    expected = torch.maximum(l_inf, l_2).mean() + 2.0 * losses.bound_alignment(lb_inf, lb_2, gamma)
    assert ba.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # CROWN-IBP mixing: lb = beta * lb_crown_ibp + (1 - beta) * lb_ibp
    batch.crown_ibp_beta = 0.25
    lb_cibp = net.ball_bounds(batch.x, batch.y, "linf", 0.05, "crown-ibp")
    mixed = make_method("ibp-linf").step(net, batch)
    expected = losses.certified_ce(0.25 * lb_cibp + 0.75 * lb_inf).mean()
    assert mixed.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    batch.crown_ibp_beta = 0.0
    # kappa mixes the natural loss in
    batch.kappa = 0.25
    single = make_method("ibp-linf").step(net, batch)
    ce = F.cross_entropy(batch.logits, batch.y)
    assert single.loss.item() == pytest.approx((0.25 * ce + 0.75 * l_inf.mean()).item(), rel=1e-5)


def test_random_halves_without_ba_bound_each_half_for_its_norm():
    net, batch = _net_and_batch()
    state = batch.generator.get_state()
    out = make_method("cure-random").step(net, batch)
    batch.generator.set_state(state)
    a, b = losses.random_halves(len(batch.y), batch.generator)
    l_inf = losses.certified_ce(net.ball_bounds(batch.x, batch.y, "linf", 0.05))
    l_2 = losses.certified_ce(net.ball_bounds(batch.x, batch.y, "l2", 0.25))
    assert out.loss.item() == pytest.approx(losses.random_loss(l_inf, l_2, a, b).item(), rel=1e-4)
    assert out.certified == {}  # partial bounds certify nobody: the trainer fills the masks in


def test_unsound_training_bounds_report_no_certificates():
    net, batch = _net_and_batch()
    for name in ("sabr-linf", "l2-defence"):
        assert make_method(name).step(net, batch).certified == {}
    out = make_method("cure-joint", MethodOptions(linf_variant="sabr")).step(net, batch)
    assert set(out.certified) == {"l2"}


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.25)])
def test_mtl_ibp_block_is_its_formula_on_sound_ball_bounds(norm, eps):
    from cure_lirpa.attacks import expressive_attack_point

    net, batch = _net_and_batch()
    opts = MethodOptions(mtl_alpha_linf=0.3, mtl_alpha_l2=0.7)
    state = batch.generator.get_state()
    out = make_method(f"mtl-ibp-{norm}", opts).step(net, batch)
    batch.generator.set_state(state)
    lb = net.ball_bounds(batch.x, batch.y, norm, eps)
    p = math.inf if norm == "linf" else 2.0
    x_adv = expressive_attack_point(net.model, batch.x, batch.y, p, eps, 1, batch.generator)
    assert NormBall(p, eps).contains(x_adv, batch.x).all()
    adv = F.cross_entropy(net.model(x_adv), batch.y, reduction="none")
    a = 0.3 if norm == "linf" else 0.7
    expected = ((1 - a) * adv + a * losses.certified_ce(lb)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the IBP ball bounds are sound, so the step reports their certificates
    assert torch.equal(out.certified[norm], (lb > 0).all(1))
    # the attack point is worse for the model than the clean input, on average
    clean = F.cross_entropy(net.model(batch.x), batch.y, reduction="none")
    assert adv.mean() > clean.mean()


def test_cure_joint_with_mtl_ibp_blocks_combines_their_losses():
    net, batch = _net_and_batch()
    # alpha 1 on both norms: the expressive losses are the IBP losses, the attack is not run
    opts = MethodOptions(
        linf_variant="mtl-ibp", l2_variant="mtl-ibp", mtl_alpha_linf=1.0, mtl_alpha_l2=1.0
    )
    out = make_method("cure-joint", opts).step(net, batch)
    ibp = make_method("cure-joint").step(net, batch)
    assert out.loss.item() == pytest.approx(ibp.loss.item(), rel=1e-6)
    assert set(out.certified) == {"linf", "l2"}
    half = MethodOptions(linf_variant="mtl-ibp", l2_variant="mtl-ibp", mtl_alpha_linf=0.5)
    out = make_method("cure-max", half).step(net, batch)
    assert out.parts["linf"] < ibp.parts["linf"]  # CE at a PGD point < IBP loss, on average


def test_ibp_regulariser_is_added_during_the_ramp_only():
    net, batch = _net_and_batch()
    plain = make_method("ibp-linf").step(net, batch)
    batch.reg_weight = 0.5
    out = make_method("ibp-linf").step(net, batch)
    assert "ibp_reg" in out.parts and out.parts["ibp_reg"] >= 0
    assert out.loss.item() == pytest.approx(plain.loss.item() + out.parts["ibp_reg"], rel=1e-5)
    c = tiny(ibp_reg=2.0, warmup_epochs=1.0, ramp_epochs=2.0).validated()
    ramp = make_ramp(c, 10)
    from cure_lirpa.training.certified import ibp_reg_weight_at

    assert ibp_reg_weight_at(0, c, ramp) == 2.0  # warm-up: eps 0
    mid = ibp_reg_weight_at(20, c, ramp)
    eps_mid = schedule_at(c, 20, 10, ramp).eps["linf"]
    assert mid == pytest.approx(2.0 * (1 - eps_mid / c.train_eps_linf)) and 0 < mid < 2.0
    assert ibp_reg_weight_at(30, c, ramp) == 0.0  # ramp over
    with pytest.raises(UserError, match="l∞"):
        tiny(method="ibp-l2", ibp_reg=1.0).validated()


def test_ibp_init_draws_shi_et_al_weights():
    from cure_lirpa.models import ibp_init

    model = build_model("cnn-small", *MNIST)
    last = model.body[-1].weight.detach().clone()
    ibp_init(model, torch.Generator().manual_seed(0))
    weights = [m.weight for m in model.body if hasattr(m, "weight")]
    for w in weights[:-1]:
        fan_in = w[0].numel()
        assert w.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.1)
    assert torch.equal(weights[-1], last)


def test_a_short_mtl_ibp_run_certifies_what_natural_training_does_not(tmp_path):
    from cure_lirpa.bounds.classifier import certified
    from cure_lirpa.data import load_dataset, stack, take

    x, y = stack(take(load_dataset("sample", "test"), 0, 200))
    accs = {}
    for method in ("natural", "mtl-ibp-linf"):
        c = tiny(
            method=method,
            init="ibp",
            train_count=512,
            batch_size=32,
            warmup_epochs=0.5,
            ramp_epochs=1.0,
        )
        train(c, tmp_path / method, progress=False, log=None)
        model = model_from_checkpoint(load_checkpoint(tmp_path / method / "checkpoint.pt")).eval()
        lb = BoundedClassifier(model, (1, 28, 28)).margin_lower_bounds(
            x, y, NormBall(math.inf, 0.05)
        )
        accs[method] = certified(lb).float().mean().item()
    assert accs["mtl-ibp-linf"] > accs["natural"] + 0.2, accs


def test_ba_needs_a_multi_norm_method():
    with pytest.raises(UserError, match="multi-norm"):
        make_method("ibp-linf", ba_eta=1.0)
    with pytest.raises(UserError, match="unknown training method"):
        make_method("pgd")


# ---------------------------------------------------------------------------------------------
# training runs


RUNS = [(name, {}) for name in METHODS] + [
    ("cure-max", {"ba_eta": 2.0}),
    ("cure-random", {"ba_eta": 0.5, "ba_direction": "linf"}),
    ("cure-joint", {"linf_variant": "sabr", "l2_variant": "defence"}),
]


@pytest.mark.parametrize("method,extra", RUNS, ids=[f"{m}{'+' if e else ''}" for m, e in RUNS])
def test_each_method_lowers_its_loss_and_writes_a_loadable_checkpoint(tmp_path, method, extra):
    config = tiny(method=method, **extra)
    result = train(config, tmp_path / "run", progress=False, log=None)
    losses_ = [h["loss"] for h in result.history]
    assert len(losses_) == 3 and all(math.isfinite(v) for v in losses_)
    assert losses_[-1] < losses_[0], losses_
    rec = result.history[-1]
    assert set(rec["certified"]) == {"linf", "l2", "union"}
    assert rec["certified"]["union"] <= min(rec["certified"]["linf"], rec["certified"]["l2"])
    assert rec["eps"] == {"linf": 0.05, "l2": 0.25}
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["epoch"] == 3 and ckpt["config"]["method"] == method
    model = model_from_checkpoint(ckpt)
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_warmup_is_natural_and_eps_ramps(tmp_path):
    config = tiny(method="ibp-linf", epochs=3, warmup_epochs=1.0, ramp_epochs=1.0, kappa_start=0.5)
    result = train(config, tmp_path / "run", progress=False, log=None)
    h = result.history
    assert h[0]["eps"]["linf"] == 0.0 and h[0]["parts"]["linf"] == pytest.approx(
        h[0]["parts"]["ce"]
    )
    assert 0 < h[1]["eps"]["linf"] <= 0.05 and h[2]["eps"]["linf"] == 0.05
    c = config.validated()
    ramp = make_ramp(c, 3)
    assert schedule_at(c, 0, 3, ramp).kappa == 0.5 and schedule_at(c, 6, 3, ramp).kappa == 0.0


def test_resume_after_a_kill_gives_identical_weights(tmp_path):
    config = tiny(
        method="cure-max",
        linf_variant="sabr",
        ba_eta=1.0,
        arch="cnn7",
        arch_kwargs={"width": 2},
        train_count=130,
        warmup_epochs=0.5,
        ramp_epochs=1.0,
    )
    full = train(config, tmp_path / "full", progress=False, log=None)
    part = train(config, tmp_path / "part", progress=False, log=None, stop_after=2)
    assert part.epoch == 2
    again = train(config, tmp_path / "part", resume=True, progress=False, log=None)
    assert again.epoch == 3
    a, b = weights(full.checkpoint), weights(again.checkpoint)
    assert same(a, b)
    # BatchNorm running statistics reached the saved model (they live in the bounded module)
    assert any("running_mean" in k and v.abs().sum() > 0 for k, v in a.items())
    assert [h["loss"] for h in full.history] == [h["loss"] for h in again.history]


def test_gradient_projection_resumes_exactly_after_a_kill_in_the_natural_half(tmp_path):
    config = tiny(method="cure-joint", gp_beta=0.5, ramp_epochs=1.0, epochs=3)
    full = train(config, tmp_path / "full", progress=False, log=None)
    assert [h["gp"] for h in full.history] == [False, True, True]
    assert "gp_natural_loss" in full.history[1]

    class Kill(Exception):
        pass

    def kill(info):
        if info["epoch"] == 1 and info["phase"] == "natural" and info["step"] == 1:
            raise Kill

    with pytest.raises(Kill):
        train(config, tmp_path / "part", progress=False, log=None, callback=kill)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    resumed = train(config, tmp_path / "part", resume=True, progress=False, log=None)
    assert same(weights(full.checkpoint), weights(resumed.checkpoint))
    state = load_checkpoint(resumed.checkpoint)["trainer_state"]
    assert state["gp"]["epochs_done"] == 2


def test_gradient_projection_merges_the_two_sub_epochs(tmp_path, monkeypatch):
    """The GP epoch's weights are project_gradients(theta0, theta_c, theta_n, beta)."""
    import cure_lirpa.training.certified as training

    seen = {}
    real = training.project_gradients

    def spy(theta0, theta_c, theta_n, beta):
        seen.update(theta0=theta0, theta_c=theta_c, theta_n=theta_n, beta=beta)
        return real(theta0, theta_c, theta_n, beta)

    monkeypatch.setattr(training, "project_gradients", spy)
    config = tiny(method="ibp-linf", gp_beta=0.8, ramp_epochs=1.0, epochs=2)
    result = train(config, tmp_path / "run", progress=False, log=None)
    assert seen["beta"] == 0.8
    assert not same(seen["theta_c"], seen["theta_n"])
    merged = real(seen["theta0"], seen["theta_c"], seen["theta_n"], 0.8)
    assert same(weights(result.checkpoint), merged)


def test_resume_refuses_another_configuration_and_extends_epochs(tmp_path):
    config = tiny(method="ibp-l2", epochs=1)
    train(config, tmp_path / "run", progress=False, log=None)
    with pytest.raises(UserError, match="other settings"):
        train(dataclasses.replace(config, lr=1e-2), tmp_path / "run", resume=True, log=None)
    with pytest.raises(UserError, match="already holds a train run"):
        train(config, tmp_path / "run", log=None)
    more = train(dataclasses.replace(config, epochs=2), tmp_path / "run", resume=True, log=None)
    assert more.epoch == 2 and len(more.history) == 2


def test_fine_tuning_starts_from_the_checkpoint(tmp_path):
    base = train(tiny(method="ibp-linf", epochs=1), tmp_path / "base", progress=False, log=None)
    config = tiny(method="cure-max", ba_eta=0.5, epochs=1, lr=1e-12, init_from=str(base.checkpoint))
    ft = train(config, tmp_path / "ft", progress=False, log=None)
    a, b = weights(base.checkpoint), weights(ft.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    bad = dataclasses.replace(config, arch_kwargs={"width": 5})
    with pytest.raises(UserError, match="--init-from"):
        train(bad, tmp_path / "bad", log=None)
    assert not (tmp_path / "bad").exists()


def test_presets_set_the_paper_defaults_and_yield_to_explicit_options():
    v = preset_values("cure-scratch", "mnist", 0.1)
    assert (v["method"], v["ba_eta"], v["gp_beta"], v["lr"]) == ("cure-max", 2.0, 0.8, 5e-4)
    assert v["sabr_lambda"] == 0.4 and v["ba_direction"] == "l2"
    assert preset_values("cure-scratch", "cifar10", 8 / 255)["sabr_lambda"] == 0.7
    assert preset_values("cure-scratch", "mnist", 0.3)["ba_eta"] == 0.5
    c = apply_preset(TrainConfig(epochs=7, gp_beta=0.3), "cure-scratch", {"epochs", "gp_beta"})
    assert c.gp_beta == 0.3 and c.ba_eta == 2.0 and c.epochs == 7
    assert c.ramp_epochs == pytest.approx(2.0) and c.lr_milestones == (5.0, 6.0)
    ft = apply_preset(TrainConfig(init_from="x.pt"), "cure-finetune", ())
    assert (ft.ba_eta, ft.gp_beta, ft.warmup_epochs) == (0.5, 0.5, 2.0)
    with pytest.raises(UserError, match="--init-from"):
        apply_preset(TrainConfig(), "cure-finetune", ()).validated()


def test_cure_mtl_preset_trains_joint_with_an_mtl_l2_block(tmp_path):
    for dataset, alpha in (("mnist", 0.3), ("cifar10", 0.1)):
        v = preset_values("cure-mtl", dataset, 0.1)
        assert (v["method"], v["linf_variant"], v["l2_variant"]) == ("cure-joint", "ibp", "mtl-ibp")
        assert v["mtl_alpha_l2"] == alpha
    assert preset_values("cure-mtl", "cifar10")["init"] == "ibp"
    base = tiny(epochs=2)
    explicit = {"arch", "arch_kwargs", "train_count", "batch_size", "epochs", "lr"}
    config = apply_preset(base, "cure-mtl", explicit).validated()
    assert config.mtl_alpha_l2 == 0.3 and config.warmup_epochs == pytest.approx(1 / 6, abs=1e-4)
    result = train(config, tmp_path / "run", progress=False, log=None)
    parts = result.last["parts"]
    assert {"linf", "l2"} <= set(parts) and all(math.isfinite(v) for v in parts.values())


def test_step_time_is_measured():
    from cure_lirpa.data import load_dataset, stack, take

    x, y = stack(take(load_dataset("sample", "train"), 0, 16))
    t = step_time(tiny(method="ibp-linf"), x, y, repeats=1)
    assert 0 < t < 30


def test_timed_step_is_the_training_step(monkeypatch):
    """step_time runs the loop's step: gradient clipping and the training-certificate pass included
    (and neither when the config turns them off)."""
    from cure_lirpa.data import load_dataset, stack, take

    calls = {"clip": 0, "certify": 0}
    clip = torch.nn.utils.clip_grad_norm_
    certify = TrainingNetwork.certify

    def counting_clip(*a, **k):
        calls["clip"] += 1
        return clip(*a, **k)

    def counting_certify(self, *a, **k):
        calls["certify"] += 1
        return certify(self, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    monkeypatch.setattr(TrainingNetwork, "certify", counting_certify)
    x, y = stack(take(load_dataset("sample", "train"), 0, 16))
    step_time(tiny(method="sabr-linf"), x, y, repeats=2)  # warm-up + 2 timed steps
    assert calls == {"clip": 3, "certify": 6}  # SABR's box certifies no norm: both are checked
    calls.update(clip=0, certify=0)
    step_time(tiny(method="sabr-linf", grad_clip=0.0, train_cert=False), x, y, repeats=2)
    assert calls == {"clip": 0, "certify": 0}


def test_step_times_cpu_clock_reads_process_time(monkeypatch):
    """clock='cpu' times the step with the process's CPU clock (what a loaded machine inflates
    least), not with wall time; an unknown clock is refused."""
    import itertools

    from cure_lirpa.data import load_dataset, stack, take
    from cure_lirpa.training import timing as training

    ticks = itertools.count()
    monkeypatch.setattr(training.time, "process_time", lambda: 2.0 * next(ticks))
    x, y = stack(take(load_dataset("sample", "train"), 0, 16))
    t = training.step_times({"a": tiny(), "b": tiny(method="ibp-linf")}, x, y, 2, clock="cpu")
    assert t == {"a": 2.0, "b": 2.0}  # one tick of 2 s between the two reads around each step
    with pytest.raises(UserError, match="clock"):
        training.step_times({"a": tiny()}, x, y, 1, clock="thread")
