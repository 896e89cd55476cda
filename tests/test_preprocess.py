"""`vitlab.preprocess` against transformers' CLIP and SigLIP image processors, on real photos.

Photos: scikit-image's bundled sample images (astronaut, coffee, chelsea, camera), so no download; plus
grayscale, RGBA, palette-with-transparency and odd sizes made from them.
Measured (transformers 5.23, torch 2.14, Pillow 13): backend "torch" equals the default torchvision-backed
`CLIPImageProcessor` / `SiglipImageProcessor`, and backend "pil" equals `CLIPImageProcessorPil` /
`SiglipImageProcessorPil`, both exactly up to float rounding (max 5e-7 in normalised units; tolerance 1e-5).
The two resampling kernels disagree with each other by up to 3 8-bit levels (17x500 stretched to 224x224;
0.2-0.4% of values by one level on the plain photos, ~18% on some aspect ratios), which the last check bounds.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.preprocess import CLIP_MEAN, ImagePreprocess, clip_preprocess, siglip_preprocess

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")


def _photos() -> dict[str, Image.Image]:
    astronaut = Image.fromarray(skdata.astronaut())  # 512 x 512 RGB
    coffee = Image.fromarray(skdata.coffee())  # 600 x 400, landscape
    chelsea = Image.fromarray(skdata.chelsea())  # 451 x 300
    rgba = astronaut.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))  # transparent left, opaque right
    rgba.putalpha(Image.fromarray(alpha))
    palette = coffee.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0  # palette entry 0 is see-through
    return {
        "astronaut": astronaut, "coffee": coffee, "chelsea": chelsea,
        "gray": Image.fromarray(skdata.camera()),  # mode L
        "rgba": rgba, "palette": palette,
        "300x200": chelsea.resize((300, 200)), "17x500": coffee.crop((100, 0, 117, 400)).resize((17, 500)),
        "portrait": chelsea.transpose(Image.Transpose.ROTATE_90),
    }


PHOTOS = _photos()


def _hf(name):
    if name == "clip_pil":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as P
    elif name == "siglip_pil":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as P
    else:
        P = transformers.CLIPImageProcessor if name == "clip" else transformers.SiglipImageProcessor
    return P()


def _reference(processor, image) -> np.ndarray:
    return processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("photo", list(PHOTOS))
def test_matches_transformers(kind, photo):
    make = clip_preprocess if kind == "clip" else siglip_preprocess
    image = PHOTOS[photo]
    got = {backend: make(backend=backend)(image)[0].numpy() for backend in ("torch", "pil")}
    assert got["torch"].shape == (3, 224, 224) and got["torch"].dtype == np.float32
    np.testing.assert_allclose(got["torch"], _reference(_hf(kind), image), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["pil"], _reference(_hf(f"{kind}_pil"), image), atol=1e-5, rtol=0)
    std = np.asarray(make().std, np.float32)[:, None, None]
    levels = np.abs(got["torch"] - got["pil"]) * std * 255  # difference in 8-bit levels
    assert levels.max() <= 3.0 + 1e-3


def test_rgba_is_composited_on_white():
    """A fully transparent image becomes white, not black."""
    clear = Image.new("RGBA", (40, 30), (10, 20, 30, 0))
    x = ImagePreprocess(size=8, resize="square", crop_size=None, mean=(0, 0, 0), std=(1, 1, 1))(clear)
    assert torch.allclose(x, torch.ones_like(x))


def test_shortest_edge_rule_and_crop():
    p = clip_preprocess(224)
    assert p.resized_size(300, 200) == (336, 224)
    assert p.resized_size(17, 500) == (224, int(224 * 500 / 17))
    out = p([PHOTOS["coffee"], PHOTOS["17x500"]])
    assert out.shape == (2, 3, 224, 224)
    # a uniform image normalises to (value/255 - mean) / std everywhere
    flat = p(Image.new("RGB", (50, 70), (255, 0, 128)))[0, :, 0, 0]
    expect = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(p.std)
    torch.testing.assert_close(flat, expect.float(), atol=1e-6, rtol=0)


def test_from_hf_dict_round_trip():
    for kind in ("clip", "siglip"):
        cfg = _hf(kind).to_dict()
        assert ImagePreprocess.from_hf(cfg) == (clip_preprocess() if kind == "clip" else siglip_preprocess())
    p = siglip_preprocess(32)
    assert ImagePreprocess.from_dict(p.to_dict()) == p


def test_bad_inputs(tmp_path):
    with pytest.raises(VitlabError, match="not found"):
        clip_preprocess()(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(VitlabError, match="cannot read image"):
        clip_preprocess()(tmp_path / "junk.jpg")
    with pytest.raises(VitlabError, match="resample"):
        ImagePreprocess(resample="cubic")
    with pytest.raises(VitlabError, match="uint8"):
        clip_preprocess()(np.zeros((4, 4, 3), np.float32))
