"""Tokenizers for the text tower: a byte-level one for models trained here, an adapter for transformers'.

Both are callables `tokenizer(texts) -> LongTensor (B, context_length)`, padded to the full context length.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.errors import VitlabError


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; then BOS 256, EOS 257, PAD 258. No vocabulary file, nothing unknown.

    Each text becomes [BOS] bytes [EOS] [PAD ...], cut so that EOS always fits (CLIP pools at the EOS token).
    """

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def __init__(self, *, context_length: int = 32, lowercase: bool = True) -> None:
        if context_length < 3:
            raise VitlabError(f"context_length must be >= 3 (BOS, one byte, EOS), got {context_length}")
        self.context_length = context_length
        self.lowercase = lowercase

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        body = list(text.encode("utf-8"))[: self.context_length - 2]
        ids = [self.BOS, *body, self.EOS]
        return ids + [self.PAD] * (self.context_length - len(ids))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)  # (B, L)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Nothing to write: `to_dict` (kept in config.json) describes it completely."""

    def to_dict(self) -> dict:
        return {"type": "bytes", "context_length": self.context_length, "lowercase": self.lowercase}


class HFTokenizer:
    """A transformers tokenizer padded to the model's context length (CLIP and SigLIP both train that way)."""

    def __init__(self, tokenizer, *, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out["input_ids"]

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))

    def to_dict(self) -> dict:
        return {"type": "transformers", "context_length": self.context_length}


def load_tokenizer(directory: str | Path, info: dict | None, *, context_length: int) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a model directory describes (`info` = config.json's "tokenizer" entry, may be None).

    A directory with Hugging Face tokenizer files (tokenizer.json / tokenizer_config.json) uses transformers,
    imported only then.
    """
    directory = Path(directory)
    hf_files = any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    kind = (info or {}).get("type") or ("transformers" if hf_files else None)
    if kind == "bytes":
        return ByteTokenizer(context_length=int(info.get("context_length", context_length)),
                             lowercase=bool(info.get("lowercase", True)))
    if kind == "transformers":
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise VitlabError(f"{directory} uses a Hugging Face tokenizer: pip install transformers") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as e:
            raise VitlabError(f"cannot load the tokenizer in {directory}: {e}") from None
        return HFTokenizer(tok, context_length=int((info or {}).get("context_length", context_length)))
    raise VitlabError(f"{directory} describes no tokenizer (no 'tokenizer' entry in config.json, no tokenizer.json)")
