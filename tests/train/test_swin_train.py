"""The Swin Transformer through the shared loop (issue 22, point 5): `vitlab train --model swin-*` writes a run dir
that loads as a SwinTransformer and scores what the run reported; fine-tuning from a Swin run (head replaced, a
new size only where the windows stay); layer-wise lr decay numbered as timm's; distillation through the single
head; two torchrun processes train what one does; what a Swin cannot train with is a one-line error.
(Resume and the time budget: test_loop.py; the Swin recipes: test_recipes.py.)"""

import json

import pytest
import torch

from helpers import torchrun
from vitlab.cli import main
from vitlab.data import load_cifar10
from vitlab.errors import VitlabError
from vitlab.model import SwinTransformer, create_model, load_pretrained, model_config
from vitlab.train import resolve_recipe, train
from vitlab.train.evaluate import evaluate
from vitlab.train.finetune import init_from
from vitlab.train.optim import create_optimizer, muon_params, param_groups
from vitlab.weights import load_state_dict

# One epoch of the swin-test variant on a tiny synthetic CIFAR-10, fp32: seconds, no real data needed.
TINY = ["--recipe", "tutorial", "--model", "swin-test", "--epochs", "1", "--batch-size", "16", "--precision", "fp32",
        "--no-progress"]


def quiet(*_):
    pass


def one_line_error(capsys, argv, *, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_cifar):
    return tiny_cifar(tmp_path_factory.mktemp("data") / "cifar", train=64, test=32)


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("swin") / "run"
    assert main(["train", *TINY, "--data", str(data), "--out", str(out)]) == 0
    return out


# ---- vitlab train --model swin-test on real CIFAR-10 -------------------------------------------------------
def test_cli_run_dir_loads_as_a_swin_that_scores_what_the_run_reported(tmp_path, cifar_dir):
    out = tmp_path / "run"
    assert main(["train", "--model", "swin-test", "--train-subset", "512", "--epochs", "1", "--test-subset", "500",
                 "--precision", "fp32", "--data", str(cifar_dir), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["recipe"] == "fast" and record["config"]["model"] == "swin-test"  # the default recipe's options
    assert record["model"]["model_type"] == SwinTransformer.model_type == "vitlab_swin"
    model = load_pretrained(out)
    assert isinstance(model, SwinTransformer) and record["model"]["params"] == model.num_params()
    assert model.cfg == model_config("swin-test", image_size=32, num_classes=10)
    assert model.read_class_names(out)[:2] == ["airplane", "automobile"]
    init = create_model(model.cfg, seed=record["config"]["seed"]).state_dict()
    trained = model.state_dict()
    assert sum(not torch.equal(trained[k], init[k]) for k in init) > len(init) // 2  # it trained
    # The saved weights score what metrics.jsonl reports, with and without the recipe's TTA ...
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    proc = json.loads((out / "preprocessor_config.json").read_text())
    test = load_cifar10(cifar_dir, "test")
    images, labels = test.images[:500], test.labels[:500]
    res = evaluate(model, images, labels, mean=tuple(proc["image_mean"]), std=tuple(proc["image_std"]),
                   num_classes=10, batch_size=1000, tta="flip-translate")
    assert res.top1 == final["test_top1_tta"] and res.plain.top1 == final["test_top1"]
    assert res.plain.loss == pytest.approx(final["test_loss"], rel=1e-5)
    # ... and a plain reference (normalise by hand, argmax) agrees with the run's plain top-1.
    mean, std = (torch.tensor(proc[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
    with torch.no_grad():
        pred = model.eval()((images.float() / 255 - mean) / std).argmax(1)
    assert (pred == labels).float().mean().item() == pytest.approx(final["test_top1"], abs=2.1e-3)


# ---- fine-tuning from a Swin run ----------------------------------------------------------------------------
def test_fine_tuning_a_swin_run_replaces_its_head_and_keeps_the_rest(swin_run):
    source = load_pretrained(swin_run).eval()
    model, prov = init_from(swin_run, image_size=32, num_classes=3)
    assert isinstance(model, SwinTransformer) and model.cfg.num_classes == 3
    assert prov["kind"] == "vitlab" and prov["head"] == "replaced" and prov["source_num_classes"] == 10
    assert prov["replaced"] == ["head.fc.weight", "head.fc.bias"] and prov["files"].keys() == {"model.safetensors"}
    ours, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("head."))
    assert not ours["head.fc.weight"].any() and not ours["head.fc.bias"].any()  # zero init: uniform first logits
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), source.forward_features(x), rtol=0, atol=0)
    # 64 px: stage grids 32 and 16 keep the window of 4, so every weight carries over unchanged
    bigger, prov = init_from(swin_run, image_size=64, num_classes=10, drop_path=0.1)
    assert bigger.cfg.image_size == 64 and bigger.cfg.drop_path == 0.1 and prov["head"] == "kept"
    assert all(torch.equal(v, theirs[k]) for k, v in bigger.state_dict().items())
    assert bigger.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_fine_tuning_a_swin_refuses_in_one_line(swin_run):
    with pytest.raises(VitlabError, match=r"windows \[4, 4\] at 32 px; at 8 px they would be \[4, 2\]"):
        init_from(swin_run, image_size=8, num_classes=10)  # stage 1's grid of 2 would shrink its window
    with pytest.raises(VitlabError, match="only drop_rate, attn_drop_rate, drop_path can be changed, not width"):
        init_from(swin_run, image_size=32, num_classes=10, width=64)
    with pytest.raises(VitlabError, match="drop --variant"):
        init_from(swin_run, image_size=32, num_classes=10, variant="swin-test")


def test_finetune_recipe_and_linear_probe_on_a_swin_run(swin_run, tmp_path, data):
    """--recipe finetune --init SWIN_RUN (layer decay 0.75, drop path 0.1 through the loop), and a linear probe
    (--freeze-backbone: only head.fc moves, the backbone's dropouts off)."""
    kw = dict(init=str(swin_run), train_subset=32, test_subset=16, batch_size=16, max_steps=2, precision="fp32")
    res = train(resolve_recipe("finetune", **kw), out=tmp_path / "ft", data=data, progress=False, log=quiet)
    model = load_pretrained(res.run_dir)
    assert isinstance(model, SwinTransformer) and model.cfg.drop_path == 0.1 and res.final["step"] == 2
    record = json.loads((res.run_dir / "train_config.json").read_text())
    assert record["init"]["source"] == str(swin_run.resolve()) and record["config"]["layer_decay"] == 0.75

    res = train(resolve_recipe("finetune", **kw, freeze_backbone=True, model_args={"attn_drop_rate": 0.2}),
                out=tmp_path / "probe", data=data, progress=False, log=quiet)
    probe, source = load_pretrained(res.run_dir), load_pretrained(swin_run)
    assert probe.cfg.drop_path == 0 and probe.cfg.attn_drop_rate == 0
    record = json.loads((res.run_dir / "train_config.json").read_text())
    assert record["init"]["trainable"] == ["head.fc.weight", "head.fc.bias"]
    moved = {k for k, v in probe.state_dict().items() if not torch.equal(v, source.state_dict()[k])}
    assert moved == {"head.fc.weight", "head.fc.bias"}


# ---- optimizer groups ------------------------------------------------------------------------------------
def test_swin_layer_decay_groups_equal_timms():
    from timm.models.swin_transformer import SwinTransformer as TimmSwin
    from timm.optim import param_groups_layer_decay

    ours = create_model("swin-test", depths=(2, 3), num_heads=(1, 2), num_classes=10, seed=0)
    c = ours.cfg
    twin = TimmSwin(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depths=c.depths,
                    num_heads=c.num_heads, window_size=c.window_size, num_classes=c.num_classes)
    twin.load_state_dict(ours.state_dict())  # the same parameter names (the Swin contract)
    theirs = param_groups_layer_decay(twin, weight_decay=0.05, no_weight_decay_list=ours.no_weight_decay(),
                                      layer_decay=0.65)
    names = {id(p): n for n, p in twin.named_parameters()}
    want = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in theirs for p in g["params"]}
    got = {n: (g["lr_scale"], g["weight_decay"])
           for g in param_groups(ours, weight_decay=0.05, layer_decay=0.65) for n in g["names"]}
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n]), n
    assert len({s for s, _ in got.values()}) == 7  # patch embedding, 5 blocks, head
    # the relative position tables are not decayed (no_weight_decay), stage 1's merging learns with its block 0
    assert got["layers.1.blocks.2.attn.relative_position_bias_table"][1] == 0
    assert got["layers.1.downsample.reduction.weight"][0] == got["layers.1.blocks.0.mlp.fc1.weight"][0]


def test_muon_takes_the_swin_blocks_matrices_with_layer_decay():
    model = create_model("swin-test", num_classes=10, seed=0)
    hidden = muon_params(model)
    assert hidden["layers.0.blocks.0.attn.qkv.weight"] == 3 and hidden["layers.1.blocks.0.mlp.fc2.weight"] == 1
    assert not {"head.fc.weight", "layers.1.downsample.reduction.weight", "patch_embed.proj.weight"} & set(hidden)
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, optimizer="muon", layer_decay=0.5)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group


def test_bench_times_a_swin_against_its_timm_twin():
    """`vitlab bench --model swin-*` and the benchmarks time the same network in timm: same outputs."""
    from vitlab.bench import timm_twin

    ours = create_model("swin-test", depths=(2, 2), num_classes=10, seed=0).eval()
    twin = timm_twin(ours).eval()
    assert type(twin).__name__ == "SwinTransformer"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ours(x), rtol=0, atol=1e-5)


# ---- determinism ---------------------------------------------------------------------------------------------
def test_same_seed_same_swin_and_grad_checkpointing_changes_nothing(tmp_path, data):
    """With dropout, attention dropout and drop path on: one seed, one set of weights, also when the stages
    recompute their blocks in backward (the dropout draws replayed); another seed, other weights."""
    kw = dict(model="swin-test", model_args={"drop_rate": 0.1, "attn_drop_rate": 0.1}, drop_path=0.1,
              train_subset=32, test_subset=16, batch_size=16, epochs=1, precision="fp32")
    runs = {name: load_state_dict(train(resolve_recipe("tutorial", **kw, **extra), out=tmp_path / name, data=data,
                                        progress=False, log=quiet).run_dir / "model.safetensors")
            for name, extra in {"a": {}, "b": {}, "ckpt": {"grad_checkpointing": True}, "seed1": {"seed": 1}}.items()}
    for other in ("b", "ckpt"):
        assert all(torch.equal(runs["a"][k], runs[other][k]) for k in runs["a"]), other
    assert not torch.equal(runs["a"]["head.fc.weight"], runs["seed1"]["head.fc.weight"])


# ---- distillation ------------------------------------------------------------------------------------------
def test_a_swin_distils_through_its_single_head(tmp_path, data):
    """A soft teacher term of weight 0 leaves the very run it adds to; hard distillation changes it."""
    teacher = train(resolve_recipe("teacher", model="cnn-8-16-16", train_subset=32, test_subset=16, max_steps=2,
                                   precision="fp32"), out=tmp_path / "teacher", data=data, progress=False, log=quiet)
    kw = dict(model="swin-test", train_subset=32, test_subset=16, batch_size=16, epochs=1, precision="fp32")
    runs = {}
    for name, extra in {"plain": {}, "soft0": dict(distill="soft", distill_alpha=0.0),
                        "hard": dict(distill="hard")}.items():
        teach = {"teacher": str(teacher.run_dir)} if extra else {}
        res = train(resolve_recipe("tutorial", **kw, **teach, **extra), out=tmp_path / name, data=data,
                    progress=False, log=quiet)
        runs[name] = load_state_dict(res.run_dir / "model.safetensors"), res.steps[0]["loss"]
    plain, soft0, hard = runs["plain"], runs["soft0"], runs["hard"]
    assert soft0[1] == plain[1] and all(torch.equal(soft0[0][k], plain[0][k]) for k in plain[0])
    assert not torch.equal(hard[0]["head.fc.weight"], plain[0]["head.fc.weight"])


# ---- torchrun ------------------------------------------------------------------------------------------------
def test_two_torchrun_processes_train_a_swin_as_one_does(tmp_path, tiny_cifar, assert_same_training):
    data = tiny_cifar(tmp_path / "cifar", train=128, test=40)
    # no crop, flip or dropout: each rank's random draws are its own, so only then are 1 and 2 processes alike
    argv = ["train", "--recipe", "tutorial", "--model", "swin-test", "--epochs", "2", "--precision", "fp32",
            "--crop-padding", "0", "--no-flip", "--eval-batch-size", "16", "--lr", "3e-3", "--no-progress",
            "--data", str(data)]
    assert main([*argv, "--batch-size", "16", "--out", str(tmp_path / "one")]) == 0
    done = torchrun(tmp_path, *argv, "--batch-size", "8", "--out", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    assert isinstance(load_pretrained(two), SwinTransformer)
    a, b = load_state_dict(tmp_path / "one" / "model.safetensors"), load_state_dict(two / "model.safetensors")
    assert_same_training(a, b)
    init = create_model(load_pretrained(two).cfg, seed=0).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-2  # far beyond the tolerance: it trained
    record = json.loads((two / "train_config.json").read_text())
    assert record["launch"]["world_size"] == 2 and record["plan"]["global_batch_size"] == 16
    assert done.stdout.count("test top-1") == 1


# ---- refused options ----------------------------------------------------------------------------------------
def test_options_a_swin_cannot_train_with_are_one_line_errors(tmp_path, capsys, data, swin_run):
    swin = ["train", "--model", "swin-test", "--data", str(data), "--no-progress"]
    one_line_error(capsys, [*swin, "--resize-schedule", "16:0.5", "--out", str(tmp_path / "a")],
                   match="--resize-schedule '16:0.5': swin-test trains at one image size")
    # the 3-minute ViT recipe resizes: with a Swin model it names the option and the Swin recipe
    err = one_line_error(capsys, [*swin, "--recipe", "sprint", "--out", str(tmp_path / "b")],
                         match="--resize-schedule")
    assert "--recipe swin-sprint" in err
    one_line_error(capsys, [*swin, "--model-arg", "width=64", "--out", str(tmp_path / "c")], match="width")
    one_line_error(capsys, ["train", "--model", "swin-nope", "--out", str(tmp_path / "d")], match="swin-nope")
    # fine-tuning a Swin run with a recipe that resizes: refused once the init model is known
    one_line_error(capsys, [*swin, "--recipe", "sprint", "--init", str(swin_run), "--out", str(tmp_path / "e")],
                   match="--resize-schedule '16:0.5': swin-test trains at one image size")
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before any run dir was made
