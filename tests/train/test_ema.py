"""ModelEma against the TensorFlow ExponentialMovingAverage definition (with num_updates), written out here:

    decay_t = min(decay, (1 + t) / (10 + t))       t = number of updates before this one
    shadow  = decay_t * shadow + (1 - decay_t) * weight

(timm's ModelEma without warm-up is the same with decay_t = decay.) Buffers are copied, not averaged.
"""

import torch
from safetensors.torch import load_file
from torch import nn

from vitlab.train import Trainer, resolve_recipe, train
from vitlab.train.ema import ModelEma


def tf_decay(decay: float, t: int) -> float:
    return min(decay, (1 + t) / (10 + t))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def step_by_hand(model: nn.Module, ema: ModelEma, steps: int, decay: float, *, start: int = 0, shadow=None):
    """Give the model new random weights (an optimizer's job; those of step t depend only on t) for steps
    start..start+steps-1, updating `ema` and a float64 reference after each; returns the reference."""
    shadow = shadow or {n: p.detach().double().clone() for n, p in ema.module.named_parameters()}
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            model[1].running_mean.copy_(torch.randn(4, generator=g))
        d = tf_decay(decay, t)
        assert ema.current_decay() == d
        ema.update(model)
        for n, p in model.named_parameters():
            shadow[n] = d * shadow[n] + (1 - d) * p.detach().double()
    return shadow


def assert_shadow(ema: ModelEma, shadow: dict) -> None:
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), shadow[n], rtol=0, atol=1e-6)


def test_update_rule_with_warmup_matches_the_formula():
    model = tiny_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ModelEma(model, decay=0.6)  # warm-up (1+t)/(10+t) stays below 0.6 until t = 13.5: both regimes
    shadow = step_by_hand(model, ema, 25, 0.6)
    assert ema.updates == 25
    assert_shadow(ema, shadow)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # copied, not averaged
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    # the first update keeps only a tenth of the init (decay 0.1), not decay=0.6 of it
    fresh = tiny_model()
    e1 = ModelEma(fresh, decay=0.6)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    e1.update(fresh)
    for n, p in e1.module.named_parameters():
        torch.testing.assert_close(p, 0.1 * init[n])


def test_warmup_decay_values():
    ema = ModelEma(nn.Linear(1, 1), decay=0.999)
    got = []
    for _ in range(4):
        got.append(ema.current_decay())
        ema.update(nn.Linear(1, 1))
    assert got == [1 / 10, 2 / 11, 3 / 12, 4 / 13]
    ema.updates = 10_000
    assert ema.current_decay() == 0.999  # capped at the configured decay


def test_restored_ema_continues_the_warmup():
    """A resumed run loads the shadow and the update count: the next decays continue the same sequence."""
    model = tiny_model()
    straight = ModelEma(model, decay=0.8)
    step_by_hand(model, straight, 20, 0.8)

    model = tiny_model()
    first = ModelEma(model, decay=0.8)
    half = step_by_hand(model, first, 10, 0.8)
    resumed = ModelEma(tiny_model(), decay=0.8)
    resumed.load_state_dict(first.state_dict(), updates=first.updates)
    shadow = step_by_hand(model, resumed, 10, 0.8, start=10, shadow=half)
    assert resumed.updates == 20
    assert_shadow(resumed, shadow)
    for p, q in zip(resumed.module.parameters(), straight.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_trainer_saves_the_ema_of_every_optimizer_step(tmp_path, tiny_cifar, monkeypatch):
    """`--ema 0.9`: the saved model is the formula's average of the weights after each step; the checkpoint
    keeps the raw weights to resume from."""
    seen, init = [], {}
    after_step = Trainer.after_step

    def record(self, *args):
        if not init:  # before the first update the EMA still holds the initial weights
            init.update({n: p.detach().double().clone() for n, p in self.ema.module.named_parameters()})
        seen.append({n: p.detach().double().clone() for n, p in self.model.named_parameters()})
        after_step(self, *args)

    monkeypatch.setattr(Trainer, "after_step", record)
    cfg = resolve_recipe("tutorial", model="test", epochs=2, batch_size=16,
                         precision="fp32", ema=0.9, warmup_epochs=0)
    result = train(cfg, out=tmp_path / "run", data=tiny_cifar(tmp_path / "data"), progress=False, log=lambda m: None)
    assert len(seen) == 2 * (64 // 16) and result.final["step"] == len(seen)
    shadow = init
    for t, weights in enumerate(seen):
        d = tf_decay(0.9, t)
        shadow = {n: d * shadow[n] + (1 - d) * weights[n] for n in shadow}
    saved = load_file(tmp_path / "run" / "model.safetensors")
    for n, ref in shadow.items():
        torch.testing.assert_close(saved[n].double(), ref, rtol=0, atol=1e-6)
    assert not torch.allclose(saved["head.weight"].double(), seen[-1]["head.weight"])  # not the raw weights
