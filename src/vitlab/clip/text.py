"""The text tower: token + position embeddings, the same `Block` stack as the ViT, final LayerNorm, pooling.

ids (B, L) -> embeddings (B, L, D) -> blocks (causal mask for CLIP, none for SigLIP) -> norm -> one token (B, D)
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.clip.config import TextConfig
from vitlab.errors import VitlabError
from vitlab.model.vit import Block


def text_attention_mask(n: int, *, causal: bool, attention_mask: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
    """Boolean mask for `Attention` (True = may attend), or None when every token sees every token.

    causal: (N, N) lower triangle; attention_mask (B, N) of 1/0 (padding) hides padded keys: (B, 1, 1|N, N).
    """
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril() if causal else None  # (N, N)
    if attention_mask is not None:
        keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, N)
        mask = keys if mask is None else mask & keys  # (B, 1, N, N)
    return mask


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, D))
        self.blocks = nn.ModuleList(
            Block(D, heads=cfg.heads, mlp_dim=cfg.mlp_dim, qkv_bias=cfg.qkv_bias, norm_eps=cfg.norm_eps,
                  activation=cfg.activation)
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """timm-style trunc-normal linears; embeddings as open_clip (tokens std 0.02, positions std 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward_features(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Token states after the final norm, (B, L, D)."""
        if input_ids.ndim != 2:
            raise VitlabError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        L = input_ids.shape[1]
        if L > self.cfg.context_length:
            raise VitlabError(f"text of {L} tokens is longer than the context length {self.cfg.context_length}")
        x = self.token_embedding(input_ids) + self.pos_embed[:, :L]  # (B, L, D)
        mask = text_attention_mask(L, causal=self.cfg.causal, attention_mask=attention_mask, device=x.device)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.norm(x)

    def pool(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D): the token that summarises the text."""
        if self.cfg.pooling == "last":
            return x[:, -1]
        if self.cfg.pooling == "argmax":  # legacy CLIP: EOS was the largest id in the vocabulary
            idx = input_ids.argmax(dim=-1)
        else:  # first EOS (padding may reuse the EOS id); 0 when a row has none, as in transformers
            idx = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), idx]

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.forward_features(input_ids, attention_mask=attention_mask), input_ids)
