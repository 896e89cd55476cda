"""--optimizer muon: torch's Muon on exactly the hidden 2-D weights (q, k, v apart), AdamW on the rest."""

import copy

import torch

from vitlab.model import create_model
from vitlab.train.optim import OptimizerGroup, WarmupCosine, create_optimizer, muon_params


def _model(**kw):
    return create_model("tutorial", seed=0, depth=2, **kw)


def test_muon_takes_exactly_the_hidden_matrices():
    model = _model(pooling="map", class_token=False, stem="conv", distill_token=True)
    split = muon_params(model)
    hidden = {f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    hidden |= {f"attn_pool.{n}.weight" for n in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2")}
    assert set(split) == hidden
    assert split["blocks.0.attn.qkv.weight"] == 3 and split["attn_pool.kv.weight"] == 2
    assert split["blocks.1.mlp.fc2.weight"] == 1
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, optimizer="muon")
    adamw, muon = opt.optimizers
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in on_muon} == hidden
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_adamw == set(names.values()) - hidden  # embeddings, stem, heads, norms, biases, tokens
    assert {"patch_embed.proj.weight", "head.weight", "head_dist.weight", "dist_token", "pos_embed"} <= on_adamw


def test_qkv_is_orthogonalised_as_three_matrices():
    """One step equals torch.optim.Muon run on q, k and v held as three separate weights."""
    model = _model()
    opt = create_optimizer(model, lr=0.01, weight_decay=0.1, optimizer="muon")
    w = model.blocks[0].attn.qkv.weight
    before = w.detach().clone()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grad = w.grad.clone()
    opt.step()
    parts = [torch.nn.Parameter(t.clone()) for t in before.chunk(3)]
    for p, gp in zip(parts, grad.chunk(3)):
        p.grad = gp.clone()
    torch.optim.Muon(parts, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    torch.testing.assert_close(w.detach(), torch.cat([p.detach() for p in parts]))
    whole = torch.nn.Parameter(before.clone())
    whole.grad = grad.clone()
    torch.optim.Muon([whole], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    assert not torch.allclose(w.detach(), whole.detach(), atol=1e-4)  # fused would differ


def test_state_dict_resumes_exactly_and_the_schedule_reaches_every_group():
    def run(model, opt, steps, start=0):
        sched = WarmupCosine(1e-3, total_steps=6, warmup_steps=2)
        x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
        for s in range(start, start + steps):
            lr = sched.apply(opt, s)
            assert all(grp["lr"] == lr for grp in opt.param_groups)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    ref = _model()
    ref_opt = create_optimizer(ref, lr=1e-3, weight_decay=0.05, optimizer="muon")
    run(ref, ref_opt, 6)
    model = _model()
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, optimizer="muon")
    run(model, opt, 3)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert sorted(saved["state"]) == list(range(len(saved["state"])))  # torch's layout, one index space
    model2 = _model()
    model2.load_state_dict(weights)
    opt2 = create_optimizer(model2, lr=1e-3, weight_decay=0.05, optimizer="muon")
    assert isinstance(opt2, OptimizerGroup)
    opt2.load_state_dict(saved)
    run(model2, opt2, 3, start=3)
    for (n, a), b in zip(ref.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_checkpoint_files_round_trip():
    """The trainer's checkpoint format (flat tensors + JSON) holds the combined state."""
    import json

    from vitlab.train.checkpoint import optimizer_from_files, optimizer_to_files

    model = _model()
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, optimizer="muon")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, meta = optimizer_to_files(opt)
    meta = json.loads(json.dumps(meta))
    opt2 = create_optimizer(_model(), lr=1e-3, weight_decay=0.05, optimizer="muon")
    opt2.load_state_dict(optimizer_from_files(tensors, meta))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k]))
