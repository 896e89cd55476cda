"""Every named recipe builds and trains: its own model, augmentation, precision and (cpu-hour, sprint, swin-*) time
budget, a few steps on a tiny synthetic train subset. Accuracy targets live in benchmarks/, not here."""

import dataclasses
import json
import math

import pytest
import torch

import vitlab.train.budget as budget
from vitlab.cli import main
from vitlab.model import SwinTransformer, VisionTransformer, load_pretrained, parse_variant
from vitlab.train import RECIPES, build_model, resolve_recipe, train
from vitlab.train.recipes import recipe_for_budget

TIME_RECIPES = ["sprint", "sprint-pure", "fast", "fast-pure", "cpu-hour", "cpu-hour-pure"]
SWIN_RECIPES = ["swin-sprint", "swin-fast"]


@pytest.mark.parametrize("name", TIME_RECIPES)
def test_recipe_builds_and_steps(name, tmp_path, tiny_cifar):
    recipe = RECIPES[name]
    cfg = resolve_recipe(name, train_subset=32, test_subset=16, max_steps=2)
    result = train(cfg, out=tmp_path / "run", data=tiny_cifar(tmp_path / "data"), progress=False,
                   log=lambda m: None, recipe=name)
    assert result.final["step"] == 2 and all(math.isfinite(r["train_loss"]) for r in result.metrics)
    model = VisionTransformer.from_pretrained(tmp_path / "run")
    for k, v in recipe.model_args.items():  # the recipe's own model, not the variant's defaults
        assert getattr(model.cfg, k) == v, k
    assert model.cfg.drop_path == recipe.drop_path
    assert model.cfg.stem == ("patchify" if name.endswith("-pure") else "conv")
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["config"]["augment"]["policy"] == recipe.augment.policy
    assert record["config"]["time_budget"] == recipe.time_budget and record["plan"]["total_steps"] == 2
    assert record["config"]["optimizer"] == recipe.optimizer and record["config"]["tta"] == recipe.tta
    if recipe.tta != "none":  # the final evaluation reports the TTA accuracy beside the plain one
        assert "test_top1_tta" in result.final and "test_top1" in result.final
    if recipe.time_budget:  # the budget planned the run from measured step and epoch-end times
        assert record["plan"]["step_s"] > 0 and record["plan"]["epoch_end_s"] > 0
    init = build_model(cfg, image_size=32, num_classes=10)
    moved = [not torch.equal(p, q) for p, q in zip(model.state_dict().values(), init.state_dict().values())]
    assert sum(moved) > len(moved) // 2  # it trained: most tensors left their seeded init


def test_recipes_name_their_models_and_the_old_seed_name_still_works():
    models = {r: RECIPES[r].model for r in ["tutorial", *TIME_RECIPES]}
    assert models == {"tutorial": "tutorial", "sprint": "conv128", "sprint-pure": "cifar128", "fast": "conv128",
                      "fast-pure": "cifar128", "cpu-hour": "conv192", "cpu-hour-pure": "cifar192"}
    assert all(not RECIPES[r].model_args for r in models)  # the variant row is the model
    for name in TIME_RECIPES:  # a pure recipe is its conv-stem twin with the patchify model of the same shape
        if name.endswith("-pure"):
            twin = RECIPES[name.removesuffix("-pure")]
            conv, pure = parse_variant(twin.model), parse_variant(RECIPES[name].model)
            assert dataclasses.replace(conv, stem="patchify", name=pure.name) == pure
    with pytest.warns(FutureWarning, match="tutorial"):
        assert resolve_recipe("seed", epochs=2) == resolve_recipe("tutorial", epochs=2)


@pytest.mark.parametrize("name", SWIN_RECIPES)
def test_swin_recipe_builds_and_steps_within_its_budget(name, tmp_path, tiny_cifar):
    recipe = RECIPES[name]
    cfg = resolve_recipe(name, train_subset=32, test_subset=16, max_steps=2)
    result = train(cfg, out=tmp_path / "run", data=tiny_cifar(tmp_path / "data"), progress=False,
                   log=lambda m: None, recipe=name)
    assert result.final["step"] == 2 and all(math.isfinite(r["train_loss"]) for r in result.metrics)
    model = load_pretrained(tmp_path / "run")
    assert isinstance(model, SwinTransformer) and model.cfg.name == "swin-cifar" == recipe.model
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["config"]["time_budget"] == recipe.time_budget > 0 and record["plan"]["total_steps"] == 2
    assert record["plan"]["step_s"] > 0 and record["plan"]["epoch_end_s"] > 0  # planned from timed probes
    assert record["config"]["optimizer"] == "muon" and "test_top1_tta" in result.final


def test_swin_recipes_change_only_the_model_of_their_vit_siblings():
    """The side-by-side runs differ in the model (and what the model cannot take: resizing), not the recipe."""
    sprint, fast = RECIPES["swin-sprint"], RECIPES["swin-fast"]
    assert dataclasses.replace(sprint, model="conv128", resize_schedule="16:0.5") == RECIPES["sprint"]
    assert dataclasses.replace(fast, model="conv128", time_budget=0.0) == RECIPES["fast"]  # fast: a fixed length
    assert (sprint.time_budget, fast.time_budget) == (3, 15)


@pytest.mark.parametrize(("minutes", "recipe"), [(None, "fast"), (0, "fast"), (3, "sprint"), (5, "sprint"),
                                                 (15, "fast"), (30, "fast"), (60, "cpu-hour")])
def test_a_time_budget_alone_picks_the_recipe_made_for_it(minutes, recipe):
    assert recipe_for_budget(minutes) == recipe


@pytest.mark.parametrize(("minutes", "model", "recipe"), [
    (None, "swin-cifar", "fast"), (3, "swin-cifar", "swin-sprint"), (5, "swin-test", "swin-sprint"),
    (15, "swin-cifar", "swin-fast"), (60, "swin-cifar", "swin-fast"), (3, "conv128", "sprint")])
def test_a_time_budget_with_a_swin_model_picks_the_swin_recipe(minutes, model, recipe):
    assert recipe_for_budget(minutes, model) == recipe


def test_cli_time_budget_without_recipe_runs_the_sprint(tmp_path, tiny_cifar, monkeypatch):
    monkeypatch.setattr(budget, "process_age_s", lambda: 0.0)  # the budget counts from now, not pytest's start
    out = tmp_path / "run"
    argv = ["train", "--time-budget", "3", "--max-steps", "2", "--train-subset", "32", "--test-subset", "16",
            "--data", str(tiny_cifar(tmp_path / "data")), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["recipe"] == "sprint" and record["config"]["model"] == "conv128"


def test_cli_time_budget_with_a_swin_model_runs_the_swin_sprint(tmp_path, tiny_cifar, monkeypatch):
    monkeypatch.setattr(budget, "process_age_s", lambda: 0.0)
    out = tmp_path / "run"
    argv = ["train", "--time-budget", "3", "--model", "swin-test", "--max-steps", "2", "--train-subset", "32",
            "--test-subset", "16", "--data", str(tiny_cifar(tmp_path / "data")), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["recipe"] == "swin-sprint" and record["config"]["model"] == "swin-test"
    assert record["model"]["model_type"] == "vitlab_swin" and record["plan"]["step_s"] > 0
