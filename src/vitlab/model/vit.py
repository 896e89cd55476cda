"""The Vision Transformer (Dosovitskiy et al. 2020), readable top to bottom.

image (B, C, H, W) -> patches (B, N, D) -> [class, registers] + positions -> pre-norm blocks
-> norm -> pool (cls | gap | map) -> head -> logits (B, num_classes)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError
from vitlab.model.config import ViTConfig, parse_variant
from vitlab.model.layers import Block, MAPHead
from vitlab.model.posemb import resample_grid, sincos_2d
from vitlab.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_into,
    load_state_dict,
    read_json,
    save_state_dict,
    write_json,
)


class PatchEmbed(nn.Module):
    """Cut the image into PxP patches and project each to D channels (one strided conv)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.use_patch_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise VitlabError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        x = self.proj(x)  # (B, D, H/P, W/P)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.width
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.num_features = D
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        if cfg.pos_embed == "learned":
            n = cfg.num_patches + (cfg.num_prefix_tokens if cfg.pos_embed_prefix else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, n, D))
        elif cfg.pos_embed == "sincos2d":  # fixed, so not saved: rebuilt for any grid
            self.register_buffer("pos_embed", sincos_2d(cfg.grid_size, cfg.grid_size, D)[None], persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()

        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # grows with depth, as timm
        self.blocks = nn.ModuleList(
            Block(D, heads=cfg.heads, mlp_dim=cfg.mlp_dim, qkv_bias=cfg.qkv_bias, drop=cfg.dropout,
                  attn_drop=cfg.attn_dropout, drop_path=dpr[i], layerscale_init=cfg.layerscale_init,
                  norm_eps=cfg.norm_eps, activation=cfg.activation)
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()

        self.attn_pool = MAPHead(D, heads=cfg.heads, mlp_dim=cfg.mlp_dim, norm_eps=cfg.norm_eps,
                                 activation=cfg.activation) if cfg.pooling == "map" else None
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        if cfg.pre_logits_dim:
            self.pre_logits = nn.Linear(D, cfg.pre_logits_dim)
            self.num_features = cfg.pre_logits_dim
        else:
            self.pre_logits = None
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    # ---- initialisation (timm's default 'vit' scheme) ---------------------------------------------
    def init_weights(self) -> None:
        def init_linear(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):  # convs keep PyTorch's default, as in timm
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(init_linear)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        if self.attn_pool is not None:
            s = self.cfg.width**-0.5
            nn.init.trunc_normal_(self.attn_pool.latent, std=s, a=-2 * s, b=2 * s)

    # ---- timm-style API ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (tokens and positions; norms/biases go by ndim)."""
        return {"pos_embed", "cls_token", "reg_token", "attn_pool.latent"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    # ---- forward ----------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix positions or None, patch positions (1, h*w, D)) for this grid."""
        if self.pos_embed is None:
            return None, None
        cfg = self.cfg
        if cfg.pos_embed == "sincos2d":
            pe = self.pos_embed if grid == (cfg.grid_size, cfg.grid_size) else \
                sincos_2d(*grid, cfg.width)[None].to(self.pos_embed)
            return None, pe
        n_pre = self.num_prefix_tokens if cfg.pos_embed_prefix else 0
        prefix, patches = self.pos_embed[:, :n_pre], self.pos_embed[:, n_pre:]
        patches = resample_grid(patches, (cfg.grid_size, cfg.grid_size), grid)  # bicubic, as timm
        return (prefix if n_pre else None), patches

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, prefix + N, D) with positions, before the blocks."""
        x, grid = self.patch_embed(x)  # (B, N, D)
        pre_pos, patch_pos = self._pos_embed(grid)
        if patch_pos is not None:
            x = x + patch_pos
        prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1)  # (1, prefix, D)
            if pre_pos is not None:  # added once, before the batch broadcast: the same sums, fewer of them
                pre = pre + pre_pos
            x = torch.cat([pre.expand(x.shape[0], -1, -1), x], dim=1)  # (B, prefix + N, D)
        return self.norm_pre(self.pos_drop(x))

    def forward_features(self, x: torch.Tensor, *, return_attention: bool = False,
                         return_intermediates: bool = False):
        """Tokens after the last block and final norm, (B, prefix + N, D).

        return_attention: also a list of per-layer attention probabilities, each (B, heads, N, N).
        return_intermediates: also a list of every block's output tokens (before the final norm).
        """
        x = self.embed(x)
        attns, inter = [], []
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not return_attention:
                x, _ = checkpoint(blk, x, use_reentrant=False)
            else:
                x, a = blk(x, return_attention=return_attention)
                if return_attention:
                    attns.append(a)
            if return_intermediates:
                inter.append(x)
        x = self.norm(x)
        extra = ([attns] if return_attention else []) + ([inter] if return_intermediates else [])
        return (x, *extra) if extra else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D) by the configured pooling."""
        if self.cfg.pooling == "cls":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if self.cfg.pooling == "gap":
            return patches.mean(dim=1)
        return self.attn_pool(patches)[0]

    def forward_head(self, x: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))  # (B, D)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        if return_attention:
            feats, attns = self.forward_features(x, return_attention=True)
            return self.forward_head(feats), attns
        return self.forward_head(self.forward_features(x))

    # ---- save / load ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, class_names: list[str] | None = None) -> Path:
        """Write `config.json` + `model.safetensors` (each atomically) into `directory`.

        class_names go to `id2label` as in Hugging Face configs (read back by `read_class_names`).
        """
        directory = Path(directory)
        from vitlab import __version__

        save_state_dict(self.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        extra = {"id2label": {str(i): c for i, c in enumerate(class_names)}} if class_names else {}
        write_json(directory / CONFIG_NAME, {"model_type": "vitlab_vit", "vitlab_version": __version__,
                                             **self.cfg.to_dict(), **extra})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu"
                        ) -> VisionTransformer:
        directory = Path(directory)
        if not directory.is_dir():
            raise VitlabError(f"{directory} is not a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        cfg = ViTConfig.from_dict(read_json(directory / CONFIG_NAME))
        model = cls(cfg)
        load_into(model, load_state_dict(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
        return model.to(map_location).eval()

    @staticmethod
    def read_class_names(directory: str | Path) -> list[str] | None:
        """Class names saved with `save_pretrained(..., class_names=...)`, or None."""
        id2label = read_json(Path(directory) / CONFIG_NAME).get("id2label")
        return [id2label[str(i)] for i in range(len(id2label))] if id2label else None

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def num_params(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def create_model(variant: str | ViTConfig = "seed", *, seed: int | None = None, **overrides) -> VisionTransformer:
    """`create_model("Ti/4", image_size=32, num_classes=10)`; `seed` makes the init reproducible."""
    cfg = variant if isinstance(variant, ViTConfig) else parse_variant(variant, **overrides)
    if seed is None:
        return VisionTransformer(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(cfg)

