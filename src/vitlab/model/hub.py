"""Model directories (config.json + model.safetensors, as Hugging Face lays them out) and seeded creation.

The ViT and the CLIP/SigLIP models share this: `save_pretrained(dir)` / `Class.from_pretrained(dir)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch

from vitlab.errors import VitlabError
from vitlab.weights import CONFIG_NAME, WEIGHTS_NAME, load_into, load_state_dict, read_json, save_state_dict, write_json

# keys config.json may hold beside the config's own fields (Hugging Face style metadata)
METADATA_KEYS = ("model_type", "architectures", "vitlab_version", "id2label", "label2id")


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw from a private torch RNG seeded with `seed` (nothing changes for None); the global one is kept."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` for a module with a dataclass `cfg` (to_dict / from_dict)."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    extra_keys: ClassVar[tuple[str, ...]] = ()  # further non-config keys a subclass stores in config.json

    def save_pretrained(self, directory: str | Path, *, class_names: list[str] | None = None, **extra) -> Path:
        """Write model.safetensors, then config.json (config fields + `extra`), each atomically.

        class_names go to `id2label` as in Hugging Face configs (read back by `read_class_names`).
        """
        from vitlab.version import __version__

        directory = Path(directory)
        if class_names:
            extra["id2label"] = {str(i): c for i, c in enumerate(class_names)}
        save_state_dict(self.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        write_json(directory / CONFIG_NAME, {"model_type": self.model_type, "vitlab_version": __version__,
                                             **self.cfg.to_dict(), **extra})
        return directory

    @staticmethod
    def read_class_names(directory: str | Path) -> list[str] | None:
        """Class names saved with `save_pretrained(..., class_names=...)`, or None."""
        id2label = read_json(Path(directory) / CONFIG_NAME).get("id2label")
        return [id2label[str(i)] for i in range(len(id2label))] if id2label else None

    @classmethod
    def read_config(cls, directory: str | Path) -> dict:
        """config.json of a model directory of this class, checked for its model_type."""
        directory = Path(directory)
        if not directory.is_dir():
            raise VitlabError(f"{directory} is not a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        d = read_json(directory / CONFIG_NAME)
        if d.get("model_type", cls.model_type) != cls.model_type:
            raise VitlabError(f"{directory / CONFIG_NAME} holds a {d['model_type']!r} model, not a "
                              f"{cls.model_type!r} one")
        return d

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def summary(self) -> str:
        """One line naming the model: the line `train`, `info`, `explain` and `convert` print."""
        return self.cfg.summary(self.num_params())

    @classmethod
    def build(cls, cfg):
        """The model for a config (a subclass may pick a more specific class)."""
        return cls(cfg)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu"):
        directory = Path(directory)
        d = cls.read_config(directory)
        try:
            cfg = cls.config_class.from_dict({k: v for k, v in d.items() if k not in METADATA_KEYS + cls.extra_keys})
        except VitlabError as e:
            raise VitlabError(f"{directory / CONFIG_NAME}: {e}") from None
        model = cls.build(cfg)
        load_into(model, load_state_dict(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
        return model.to(map_location).eval()
