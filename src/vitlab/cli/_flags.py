"""Command-line flags generated from a config dataclass: one `--field-name` per field, its help the field's
`metadata["help"]`, so a field is documented once, where it is defined.

The `augment` field is spread into the flags of its own fields (`--policy`, `--mixup-alpha`, ...); bools are
`--x / --no-x`; tuples take their values space-separated (`--betas 0.9 0.98`); dicts take repeated KEY=VALUE.
Every flag defaults to None, so only the flags a user gave override the recipe or the config's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import Field

from vitlab.data import AugmentConfig
from vitlab.errors import VitlabError

AUGMENT_OMIT = ("mean", "std")  # set from the dataset, never by hand


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_fields(cls: type, augment: tuple[str, ...] | None = None) -> list[tuple[Field, type]]:
    """(field, its type) for every flag of `cls`: its fields, `augment` replaced by AugmentConfig's fields
    (all but mean/std, or those named in `augment`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "augment":
            aug_hints = typing.get_type_hints(AugmentConfig)
            out += [(a, aug_hints[a.name]) for a in dataclasses.fields(AugmentConfig)
                    if a.name not in AUGMENT_OMIT and (augment is None or a.name in augment)]
        else:
            out.append((f, hints[f.name]))
    return out


def add_config_flags(p: argparse.ArgumentParser, cls: type, *, aliases: dict[str, str] | None = None,
                     augment: tuple[str, ...] | None = None) -> None:
    """One flag per field of `cls` (see `config_fields`), default None; `aliases`: field -> an older flag name."""
    for f, typ in config_fields(cls, augment):
        names = [flag(f.name), *([aliases[f.name]] if aliases and f.name in aliases else [])]
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        kw: dict = {"dest": f.name, "default": None, "help": text}
        args = typing.get_args(typ)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) is tuple:
            kw.update(type=args[0], nargs="+" if args[-1] is Ellipsis else len(args))
        elif typ is dict or typing.get_origin(typ) is dict:
            kw.update(action="append", metavar="KEY=VALUE")
        else:
            kw["type"] = typ
        p.add_argument(*names, **kw)


def given(args: argparse.Namespace, cls: type, *, augment: tuple[str, ...] | None = None) -> dict:
    """The config fields given on the command line (flags left at None are not), flat: augmentation fields
    included, tuples as tuples, KEY=VALUE lists as dicts."""
    out = {}
    for f, typ in config_fields(cls, augment):
        value = getattr(args, f.name)
        if value is None:
            continue
        if typ is dict or typing.get_origin(typ) is dict:
            value = parse_key_values(value, flag(f.name))
        elif typing.get_origin(typ) is tuple:
            value = tuple(value)
        out[f.name] = value
    return out


def parse_key_values(items: list[str], name: str = "--model-args") -> dict:
    """["width=128", "qkv_bias=false", "stem_channels=64,128"] -> {"width": 128, "qkv_bias": False,
    "stem_channels": [64, 128]}: a comma makes a list."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VitlabError(f"{name} wants KEY=VALUE, got {item!r}")
        out[key] = [parse_value(v) for v in value.split(",")] if "," in value else parse_value(value)
    return out


def parse_value(value: str):
    """"true" -> True, "none" -> None, "12" -> 12, "0.5" -> 0.5, anything else the string."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value
