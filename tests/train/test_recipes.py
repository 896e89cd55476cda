"""Every named recipe builds and trains: its own model, augmentation, precision and (cpu-hour) time budget,
a few steps on a tiny synthetic train subset. Accuracy targets live in benchmarks/, not here."""

import json
import math

import pytest
import torch

from vitlab.model import VisionTransformer
from vitlab.train import RECIPES, build_model, resolve_recipe, train


@pytest.mark.parametrize("name", ["fast", "cpu-hour"])
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
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["config"]["augment"]["policy"] == recipe.augment.policy
    assert record["config"]["time_budget"] == recipe.time_budget and record["plan"]["total_steps"] == 2
    if recipe.time_budget:  # the budget planned the run from measured step and epoch-end times
        assert record["plan"]["step_s"] > 0 and record["plan"]["epoch_end_s"] > 0
    init = build_model(cfg, image_size=32, num_classes=10)
    moved = [not torch.equal(p, q) for p, q in zip(model.state_dict().values(), init.state_dict().values())]
    assert sum(moved) > len(moved) // 2  # it trained: most tensors left their seeded init


def test_recipes_name_their_models_and_the_old_seed_name_still_works():
    assert {RECIPES[r].model for r in ("tutorial", "fast", "cpu-hour")} == {"tutorial", "cifar128", "cifar192"}
    assert all(not RECIPES[r].model_args for r in ("tutorial", "fast", "cpu-hour"))  # the variant row is the model
    with pytest.warns(FutureWarning, match="tutorial"):
        assert resolve_recipe("seed", epochs=2) == resolve_recipe("tutorial", epochs=2)
