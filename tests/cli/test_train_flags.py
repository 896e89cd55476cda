"""The flags of `vitlab train` and `vitlab train-clip` are generated from the config dataclasses: one flag per
field, its help the field's metadata, and a flag lands in the config field of the same name."""

import argparse
import dataclasses
import typing

import pytest

from vitlab.cli import build_parser
from vitlab.cli._flags import config_fields, flag, given
from vitlab.cli.train_clip import AUGMENT as CLIP_AUGMENT
from vitlab.clip.train import ClipTrainConfig
from vitlab.data import AugmentConfig
from vitlab.train.recipes import RECIPES, TrainConfig, resolve_recipe, with_overrides

COMMANDS = {"train": (TrainConfig, None), "train-clip": (ClipTrainConfig, CLIP_AUGMENT)}
# Flags that choose what to run rather than how: no config field behind them.
CLI_ONLY = {"help", "recipe", "data", "out", "resume", "device", "download", "no_progress"}


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_has_exactly_one_flag_with_its_help(command):
    cls, augment = COMMANDS[command]
    actions = [a for a in subparser(command)._actions if a.dest not in CLI_ONLY]
    fields = config_fields(cls, augment)
    names = [f.name for f, _ in fields]
    assert sorted(a.dest for a in actions) == sorted(names)  # one flag per field, no flag without a field
    by_dest = {a.dest: a for a in actions}
    for f, _ in fields:
        action = by_dest[f.name]
        assert flag(f.name) in action.option_strings
        assert f.metadata["help"] and action.help.replace("%%", "%") == f.metadata["help"]
    # every field of the class is behind a flag: its own, or (augment) those of its fields
    assert {f.name for f in dataclasses.fields(cls)} - {"augment"} <= set(names)
    assert set(names) & {f.name for f in dataclasses.fields(AugmentConfig)}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_flag_round_trips_into_its_field(command):
    """Every flag, given the field's default of another value, is parsed back to that value and type."""
    cls, augment = COMMANDS[command]
    defaults = {**dataclasses.asdict(cls()), **dataclasses.asdict(cls().augment)}
    for f, typ in config_fields(cls, augment):
        value = defaults[f.name]
        if typ is bool:
            argv = [flag(f.name) if value else "--no-" + f.name.replace("_", "-")]
        elif typing.get_origin(typ) is tuple:
            argv = [flag(f.name), *map(str, value)]
        elif typ is dict:
            value = {"width": 64, "qkv_bias": False}
            argv = [flag(f.name), "width=64", flag(f.name), "qkv_bias=false"]
        else:
            argv = [flag(f.name), str(value)]
        got = given(subparser(command).parse_args(argv), cls, augment=augment)
        kind = typing.get_origin(typ) or typ  # the annotation's type: `epochs: float = 10` parses to 10.0
        assert got == {f.name: value} and type(got[f.name]) is kind, (argv, got)


def test_train_flags_override_only_the_fields_given():
    args = subparser("train").parse_args(["--betas", "0.9", "0.95", "--model-arg", "width=64", "--no-flip",
                                          "--randaug-n", "3", "--lr", "0.01", "--compile", "--log-every", "5",
                                          "--teacher-recipe", "fast", "--switch-prob", "0.25"])
    config = resolve_recipe("fast", **given(args, TrainConfig))
    assert config.betas == (0.9, 0.95) and config.lr == 0.01 and config.compile and config.log_every == 5
    assert config.model_args == {"width": 64} and config.teacher_recipe == "fast"
    assert not config.augment.flip and config.augment.randaug_n == 3 and config.augment.switch_prob == 0.25
    untouched = dataclasses.replace(config, betas=RECIPES["fast"].betas, lr=RECIPES["fast"].lr, compile=False,
                                    log_every=10, model_args={}, teacher_recipe="teacher",
                                    augment=RECIPES["fast"].augment)
    assert untouched == RECIPES["fast"]


def test_model_arg_values_are_typed_and_a_comma_makes_a_list():
    args = subparser("train").parse_args(["--model-arg", "stem_channels=64,128", "--model-arg", "qkv_bias=false",
                                          "--model-arg", "dropout=0.1", "--model-arg", "pooling=gap"])
    config = resolve_recipe("fast", **given(args, TrainConfig))
    assert config.model_args == {"stem_channels": [64, 128], "qkv_bias": False, "dropout": 0.1, "pooling": "gap"}
    from vitlab.model import model_config

    assert model_config(config.model, **config.model_args).conv_stem_channels == (64, 128)


def test_train_clip_flags_and_old_names():
    p = subparser("train-clip")
    args = p.parse_args(["--train-limit", "100", "--eval-limit", "50", "--templates", "a {}.", "the {}.",
                         "--policy", "randaug", "--loss", "clip"])
    config = with_overrides(ClipTrainConfig(), **given(args, ClipTrainConfig, augment=CLIP_AUGMENT))
    assert (config.train_subset, config.test_subset, config.templates) == (100, 50, ("a {}.", "the {}."))
    assert config.augment.policy == "randaug" and config.loss == "clip" and config.lr == ClipTrainConfig().lr
    assert config.augment.mixup_alpha == 0  # captions are the targets: no mixing, and no flag for it
    with pytest.raises(SystemExit):
        p.parse_args(["--mixup-alpha", "0.8"])
