"""What the demo page shows, without a browser: the numbers against `vitlab predict` and the model's own attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.demo.explorer import CLASS_TOKEN, PATCH, Explorer, find_test_images
from vitlab.errors import VitlabError
from vitlab.inspect.attention import attention_rollout, rollout_map
from vitlab.model import VisionTransformer
from vitlab.train.predict import predict


def photo(path, size, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("size", [(32, 32), (57, 41)], ids=["cifar_size", "resized"])
def test_same_top1_and_probabilities_as_predict(size, demo_run, tmp_path):
    run = demo_run()
    image = photo(tmp_path / "img.png", size)
    view = Explorer.open(run).analyse(image)
    [pred] = predict(run, [image], top_k=10)
    top = view.probs.topk(10)
    assert [Explorer.open(run).class_names[i] for i in top.indices] == pred.labels
    torch.testing.assert_close(top.values, torch.tensor(pred.probs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides", [{}, dict(pooling="map", class_token=False, reg_tokens=1)],
                         ids=["cls", "map_registers"])
def test_attention_and_rollout_are_the_models(overrides, demo_run, tmp_path):
    run = demo_run(**overrides)
    ex = Explorer.open(run)
    view = ex.analyse(photo(tmp_path / "img.png", (32, 32)))
    model = VisionTransformer.from_pretrained(run)
    p, g = model.num_prefix_tokens, model.cfg.grid_size
    with torch.no_grad():
        _, attns = model(view.x, return_attention=True)  # the public API: L x (1, H, N, N)
    for layer in range(model.cfg.depth):
        a = attns[layer][0]
        torch.testing.assert_close(ex.attention_row(view, layer, 1, PATCH, 5), a[1, p + 5, p:].reshape(g, g))
        want = a.mean(0)[0, p:] if model.cfg.class_token else a.mean(0)[p:, p:].mean(0)
        torch.testing.assert_close(ex.attention_row(view, layer, None, CLASS_TOKEN, None), want.reshape(g, g))
    if model.cfg.pooling == "cls":  # rollout (Abnar & Zuidema): the class token's row of the product
        want = rollout_map(attention_rollout(attns, num_prefix_tokens=p), pooling="cls", num_prefix_tokens=p)
        torch.testing.assert_close(view.rollout, want[0].reshape(g, g))
    assert view.rollout.shape == (g, g)


def test_drawing_sizes_and_patch_picking(demo_run, tmp_path):
    pytest.importorskip("matplotlib", reason="overlays use matplotlib's colour maps (pip install 'vitlab[plot]')")
    ex = Explorer.open(demo_run())
    view = ex.analyse(photo(tmp_path / "img.png", (32, 32)))
    side = 32 * ex.scale
    for img in (ex.overlay_image(view, view.rollout), ex.patch_grid_image(view, 3)):
        assert img.size == (side, side) and img.mode == "RGB"
    cell = 4 * ex.scale
    assert ex.patch_at(0, 0) == 0
    assert ex.patch_at(cell * 2 + 1, cell * 3 + 1) == 3 * 8 + 2
    assert ex.patch_at(side - 1, side - 1) == 63 and ex.patch_at(side + 50, side + 50) == 63
    marked = np.asarray(ex.patch_grid_image(view, 0))
    assert tuple(marked[0, 0]) == (255, 221, 0)  # the picked patch is outlined


def test_bad_images_are_vitlab_errors(demo_run, tmp_path):
    ex = Explorer.open(demo_run())
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = photo(tmp_path / "ok.png", (64, 64))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    for bad in (text, cut, tmp_path / "missing.png"):
        with pytest.raises(VitlabError):
            ex.analyse(bad)


def test_test_images_come_from_the_data_dir(demo_run, tiny_cifar, tmp_path):
    root = tiny_cifar(tmp_path / "cifar", test=12)
    ex = Explorer.open(demo_run(), data=root)
    assert len(ex.test_images) == 12
    pixels, name = ex.test_images.get(3)
    assert pixels.shape == (32, 32, 3) and name == "cat"  # labels cycle through the classes
    assert ex.analyse(pixels).probs is not None
    with pytest.raises(VitlabError, match="0..11"):
        ex.test_images.get(12)
    with pytest.raises(VitlabError):
        find_test_images(ex.src, tmp_path / "nowhere")


def test_clip_zero_shot_agrees_with_the_zeroshot_command(tmp_path, capsys):
    from vitlab.cli import main
    from vitlab.clip.config import CLIPConfig, TextConfig
    from vitlab.clip.model import create_clip
    from vitlab.clip.tokenizer import ByteTokenizer
    from vitlab.model.config import ViTConfig
    from vitlab.preprocess import siglip_preprocess

    vision = ViTConfig(image_size=32, patch_size=8, num_classes=0, width=32, depth=2, heads=2, mlp_dim=64,
                       class_token=False, pooling="map")
    text = TextConfig(vocab_size=259, context_length=16, width=32, depth=2, heads=2, mlp_dim=64,
                      eos_token_id=ByteTokenizer.EOS, causal=False, pooling="last")
    model = create_clip(CLIPConfig(vision=vision, text=text, kind="siglip", embed_dim=32), seed=0)
    model.save_pretrained(tmp_path / "siglip", tokenizer=ByteTokenizer(context_length=16),
                          preprocess=siglip_preprocess(32))
    image = photo(tmp_path / "img.png", (40, 30))
    ex = Explorer.open(tmp_path / "siglip")
    view = ex.analyse(image)
    assert view.probs is None and view.rollout.shape == (4, 4)
    scores = ex.zero_shot(view, "cat, dog, ship", "a photo of a {}.\na {}")
    assert main(["zeroshot", str(tmp_path / "siglip"), str(image), "--classes", "cat,dog,ship",
                 "--templates", str(_templates(tmp_path))]) == 0
    printed = {line.split()[1]: float(line.split()[0]) for line in capsys.readouterr().out.splitlines()[2:]}
    assert printed == pytest.approx(scores, abs=1e-4)
    with pytest.raises(VitlabError, match="two"):
        ex.zero_shot(view, "cat", "")


def _templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\na {}\n")
    return path
