"""`--to onnx`: the model as ONNX graphs (torch.onnx's dynamo exporter) with a dynamic batch dimension.

ViT and Swin: `model.onnx`, pixel_values (B, C, S, S) -> logits (B, classes), or pooled features without a
classifier (Swin's cyclic shifts, window partitions and masks trace with the batch left dynamic).
CLIP / SigLIP: `image_encoder.onnx` (pixel_values -> unit image embeddings) and `text_encoder.onnx`
(input_ids (B, context_length) -> unit text embeddings). The source's config.json and a transformers
preprocessor_config.json go alongside, so class names and preprocessing travel with the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.export.processor import hf_image_processor_config
from vitlab.modeldir import ModelDir
from vitlab.rundir import PREPROCESSOR_NAME
from vitlab.weights import CONFIG_NAME, atomic_write, read_json, write_json

MAX_ONNX_BYTES = 2 * 1024**3  # one protobuf file; larger models would need external data files


class _Encoder(nn.Module):
    """One tower of a CLIP / SigLIP model as a module with a single tensor input."""

    def __init__(self, model: nn.Module, which: str) -> None:
        super().__init__()
        self.model, self.which = model, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.which == "image" else self.model.encode_text(x)


class _SwinLogits(nn.Module):
    """A Swin's logits by `forward_attention`'s explicit softmax: torch.onnx (torch 2.14) fails to decompose
    scaled_dot_product_attention with Swin's per-window bias when the batch is dynamic."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_attention(x)[0]


@dataclass
class Graph:
    file: str
    module: nn.Module
    example: torch.Tensor  # batch 2: the exporter specialises a batch of 1
    input_name: str
    output_name: str


def _is_swin(model: nn.Module) -> bool:
    from vitlab.model.swin import SwinTransformer

    return isinstance(model, SwinTransformer)


def image_model(src: ModelDir) -> bool:
    """An image classifier / feature extractor (ViT or Swin): one graph, a ViT image processor."""
    return src.kind == "vit" or _is_swin(src.model)


def graphs(src: ModelDir) -> list[Graph]:
    g = torch.Generator().manual_seed(0)
    if image_model(src):
        c = src.model.cfg
        x = torch.randn(2, c.in_channels, c.image_size, c.image_size, generator=g)
        module = _SwinLogits(src.model) if _is_swin(src.model) else src.model
        return [Graph("model.onnx", module, x, "pixel_values", "logits" if c.num_classes else "features")]
    v = src.model.cfg.vision
    x = torch.randn(2, v.in_channels, v.image_size, v.image_size, generator=g)
    ids = src.tokenizer(["a photo of a cat.", "a dog"])  # (2, context_length)
    return [Graph("image_encoder.onnx", _Encoder(src.model, "image"), x, "pixel_values", "image_embeds"),
            Graph("text_encoder.onnx", _Encoder(src.model, "text"), ids, "input_ids", "text_embeds")]


def export_onnx(src: ModelDir, out: Path) -> list[str]:
    size = sum(p.numel() * p.element_size() for p in src.model.parameters())
    if size > MAX_ONNX_BYTES:
        raise VitlabError(f"the weights take {size / 1024**3:.1f} GiB; one ONNX file holds at most 2 GiB")
    out.mkdir(parents=True, exist_ok=True)
    for gr in graphs(src):
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(gr.module.eval(), (gr.example,), dynamo=True, verbose=False,
                                    input_names=[gr.input_name], output_names=[gr.output_name],
                                    dynamic_shapes=({0: batch},))
        atomic_write(out / gr.file, lambda tmp, p=program: p.save(tmp, external_data=False))
    write_json(out / PREPROCESSOR_NAME, hf_image_processor_config(src.preprocess,
                                                                  "vit" if image_model(src) else src.kind))
    write_json(out / CONFIG_NAME, read_json(src.path / CONFIG_NAME))  # labels and the model's description
    return [] if image_model(src) else \
        ["the encoders return unit embeddings; rank classes by their dot products (the logit scale is in "
         "the source's model.safetensors)"]


@torch.no_grad()
def check_onnx(src: ModelDir, out: Path) -> float | None:
    """Max |difference| of onnxruntime's outputs from ours, at a batch size other than the exported one."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    worst = 0.0
    for gr in graphs(src):
        x = torch.cat([gr.example, gr.example[:1]])  # batch 3
        session = ort.InferenceSession(str(out / gr.file), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {gr.input_name: x.numpy()})[0]
        worst = max(worst, float((torch.from_numpy(theirs) - gr.module(x)).abs().max()))
    return worst
