"""`vitlab.images.open_image`: pixel limit and bombs, 16-bit / float scaling, EXIF orientation, downscaling."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.images import DEFAULT_MAX_PIXELS, open_image, to_8bit
from vitlab.preprocess import ImagePreprocess
from vitlab.train.predict import load_image


def png_header_only(path, width, height):
    """A tiny PNG file whose header claims width x height (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [8000, 20000])  # over our limit; over Pillow's own bomb limit too
def test_bomb_is_refused_before_decoding(tmp_path, side):
    path = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(VitlabError, match=rf"bomb.png( is {side}x{side} = .* million pixels, over the limit"
                                          rf"|: .*exceeds limit of .*vitlab's limit is 50 million pixels)"):
        open_image(path)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 50)).save(path)
    with pytest.raises(VitlabError, match="over the limit of 0.001 million"):
        open_image(path, max_pixels=1000)
    monkeypatch.setenv("VITLAB_MAX_IMAGE_PIXELS", "4999")
    with pytest.raises(VitlabError, match="VITLAB_MAX_IMAGE_PIXELS"):
        open_image(path)
    monkeypatch.setenv("VITLAB_MAX_IMAGE_PIXELS", "5000")
    assert open_image(path).size == (100, 50)
    monkeypatch.setenv("VITLAB_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(VitlabError, match="must be a positive number"):
        open_image(path)
    assert DEFAULT_MAX_PIXELS < Image.MAX_IMAGE_PIXELS


def test_truncated_non_image_missing_and_directory(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.jpg").write_text("not an image")
    for name, words in (("cut.png", "cut.png: OSError: image file is truncated"),
                        ("text.jpg", "text.jpg: UnidentifiedImageError"), ("missing.png", "not found")):
        with pytest.raises(VitlabError, match=words):
            open_image(tmp_path / name)
    with pytest.raises(VitlabError, match="is a directory"):
        open_image(tmp_path)


@pytest.mark.parametrize("value", [0, 1000, 32768, 65535])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, value):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 6), value, np.uint16)).save(path)  # a 16-bit grayscale PNG
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # Pillow reads it as I;16 / I (whose convert("RGB") clips to 255)
    expected = round(value / 257)
    assert np.all(np.asarray(open_image(path)) == expected)
    assert np.all(np.asarray(load_image(path)) == expected)  # predict's path: RGB, mid-gray stays mid-gray
    pre = ImagePreprocess(size=4, resize="square", crop_size=None, mean=(0, 0, 0), std=(1, 1, 1))
    assert np.allclose(pre(path).numpy(), expected / 255, atol=1e-6)


def test_float_and_32_bit_modes():
    f = Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32), "F")
    assert np.asarray(to_8bit(f)).tolist() == [[0, 128], [64, 255]]
    wide = Image.fromarray(np.array([[-10.0, 0.0], [10.0, 30.0]], np.float32), "F")  # unknown range: stretched
    assert np.asarray(to_8bit(wide)).tolist() == [[0, 64], [128, 255]]
    i32 = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    assert np.asarray(to_8bit(i32)).tolist() == [[0, 255]]


def exif_rotated_jpeg(path, orientation=6):
    """A JPEG whose pixels are stored sideways, with the EXIF tag telling viewers to rotate them."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8), 16, 0), 16, 1))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_to_files_as_hugging_face_load_image_does(tmp_path):
    image_utils = pytest.importorskip("transformers.image_utils")
    path = exif_rotated_jpeg(tmp_path / "phone.jpg")
    ours = load_image(path)
    ref = image_utils.load_image(str(path))  # what HF pipelines feed their image processors
    assert ours.size == ref.size == (48, 80)  # stored 80x48, shown rotated
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    with Image.open(path) as im:  # a PIL image passed in is used as given, as HF's processors do
        assert open_image(im).size == (80, 48)


def smooth_photo(size):
    """A smooth-ish test picture: a few sinusoids, so resizing differences show as small level changes."""
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    rgb = [np.sin(2 * np.pi * (3 * x + k)) * np.cos(2 * np.pi * (2 * y - k)) for k in (0.0, 0.3, 0.6)]
    return Image.fromarray(((np.stack(rgb, -1) + 1) * 127.5).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_files_are_downscaled_while_decoding_with_little_change(tmp_path, fmt):
    path = tmp_path / f"big.{fmt.lower()}"
    smooth_photo((2048, 1536)).save(path, format=fmt, quality=95)
    small = open_image(path, target_size=32)
    assert 128 <= min(small.size) < 1536 // 2  # shrunk by 2x or more, never below 4x the target
    assert open_image(path, target_size=1000).size == (2048, 1536)  # not much larger than needed: untouched
    pre = ImagePreprocess(size=32, resize="shortest_edge", crop_size=32, backend="pil")
    with Image.open(path) as im:
        full = pre.prepare(im.convert("RGB")).astype(int)  # decoded at full size
    diff = np.abs(pre.prepare(path).astype(int) - full)
    assert diff.mean() < 1.25 and diff.max() <= 6  # in 8-bit levels, after the final antialiased resize


def test_image_folder_skips_a_bomb_with_its_reason(tmp_path):
    from vitlab.data import load_image_folder

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "imgs" / "cat" / "ok.png")
    png_header_only(tmp_path / "imgs" / "cat" / "huge.png", 9000, 9000)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*huge.png is 9000x9000 .* over the limit"):
        ds = load_image_folder(tmp_path / "imgs", size=8, cache_dir=tmp_path / "cache")
    assert len(ds) == 1 and ds.images[0, :, 4, 4].tolist() == [10, 20, 30]
