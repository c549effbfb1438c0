"""Image decoding and the evaluation resize, on real files written by PIL, and parity with HuggingFace's processor.

One decoding (`cvt_flax.serving.decode`) serves predict, export's serving function and both image-folder training
pipelines; each kind of file a user may have is decoded as they would expect: EXIF orientation applied, 16/32-bit
and float images scaled by their range (PIL's own conversion clips them), palette, CMYK, LA/RGBA, the first frame of
an animated GIF. The centre-crop resize truncates the long side as torchvision and HuggingFace do.
"""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from cvt_flax import metadata, serving

GRADIENT = np.tile(np.arange(256, dtype=np.uint8)[None, :], (4, 1))  # 4 x 256, every 8-bit level


def _saved(im: Image.Image, path: pathlib.Path, **kwargs) -> pathlib.Path:
    im.save(path, **kwargs)
    return path


def _decoded(path: pathlib.Path, channels: int) -> np.ndarray:
    return np.asarray(serving.load_image(str(path), channels))


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = _saved(Image.fromarray(GRADIENT.astype(np.uint16) * 257), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # PIL keeps 16 bits
        clipped = np.asarray(im.convert("L"))
    assert (clipped == 255).mean() > 0.99  # what PIL's convert gives: almost white
    np.testing.assert_array_equal(_decoded(path, 1), GRADIENT)
    rgb = _decoded(path, 3)
    assert rgb.shape == (4, 256, 3) and all(np.array_equal(rgb[..., c], GRADIENT) for c in range(3))


def test_32_bit_integer_and_float_tiffs_are_scaled_by_their_range(tmp_path):
    i16 = _saved(Image.fromarray(GRADIENT.astype(np.int32) * 257), tmp_path / "i32.tif")
    np.testing.assert_array_equal(_decoded(i16, 1), GRADIENT)  # 16-bit data in a 32-bit container
    wide = _saved(Image.fromarray(GRADIENT.astype(np.int32) * 1_000_000 - 5), tmp_path / "wide.tif")
    np.testing.assert_array_equal(_decoded(wide, 1), GRADIENT)  # its own min..max
    unit = _saved(Image.fromarray(GRADIENT.astype(np.float32) / 255.0), tmp_path / "f01.tif")
    np.testing.assert_array_equal(_decoded(unit, 1), GRADIENT)
    hdr = _saved(Image.fromarray(GRADIENT.astype(np.float32) * 4.0 + 10.0), tmp_path / "fhdr.tif")
    np.testing.assert_array_equal(_decoded(hdr, 1), GRADIENT)


def test_exif_orientation_is_applied(tmp_path):
    """A 'rotated 90 degrees' tag (6, as phones write) turns a 40x20 landscape file into a 20x40 portrait image."""
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red, right half blue
    rgb[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _saved(Image.fromarray(rgb), tmp_path / "phone.jpg", exif=exif, quality=95)
    out = _decoded(path, 3)
    assert out.shape == (40, 20, 3)  # upright: rotated 90 degrees clockwise
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # the red half is on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_palette_cmyk_alpha_gray_and_gif_first_frame(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    opaque = Image.fromarray(rgb)
    # Palette with a transparent index: the colours of the palette, alpha dropped.
    pal = opaque.quantize(16)
    pal.info["transparency"] = 0
    p = _saved(pal, tmp_path / "pal.png", transparency=0)
    np.testing.assert_array_equal(_decoded(p, 3), np.asarray(pal.convert("RGB")))
    # CMYK JPEG -> RGB (PIL's conversion); LA and RGBA -> alpha dropped.
    cmyk = _saved(opaque.convert("CMYK"), tmp_path / "cmyk.jpg", quality=100)
    with Image.open(cmyk) as im:
        assert im.mode == "CMYK"
        np.testing.assert_array_equal(_decoded(cmyk, 3), np.asarray(im.convert("RGB")))
    la = _saved(Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]])), tmp_path / "la.png")
    np.testing.assert_array_equal(_decoded(la, 1), rgb[..., 0])
    rgba = _saved(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), tmp_path / "rgba.png")
    np.testing.assert_array_equal(_decoded(rgba, 3), rgb)
    gray = _saved(Image.fromarray(rgb[..., 0]), tmp_path / "gray.png")
    assert _decoded(gray, 3).shape == (6, 7, 3) and np.array_equal(_decoded(gray, 1), rgb[..., 0])
    # An animated GIF: its first frame.
    red, blue = (Image.new("RGB", (5, 5), c) for c in ((255, 0, 0), (0, 0, 255)))
    gif = _saved(red, tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(gif) as im:
        assert im.n_frames == 2
    out = _decoded(gif, 3)
    assert out.shape == (5, 5, 3) and out[..., 0].min() > 200 and out[..., 2].max() < 60


def test_training_pipelines_decode_as_predict(tmp_path):
    """The tf.data image-folder reader and the TF-free one give predict's pixels (16-bit PNG, EXIF JPEG)."""
    tf = pytest.importorskip("tensorflow")
    from cvt_flax.data import device, info, tfdata

    exif = Image.Exif()
    exif[0x0112] = 8
    files = {
        "g16.png": (Image.fromarray(GRADIENT.astype(np.uint16) * 257), {}),
        "photo.jpg": (Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 13, 3), np.uint8)), {"exif": exif}),
    }
    for name, (im, kwargs) in files.items():
        folder = tmp_path / "root" / "train" / name.split(".")[0]
        folder.mkdir(parents=True)
        im.save(folder / name, **kwargs)
    source = info._open_image_folder(str(tmp_path / "root"))
    for path, _ in source.files["train"]:
        data = pathlib.Path(path).read_bytes()
        for channels in (1, 3):
            want = serving.decode_bytes(data, channels)
            np.testing.assert_array_equal(device._decode(data, channels, None), want)
            reader = tfdata._Reader(source, channels)
            reader.source_channels = channels
            got = reader.decode(tf.constant(data)).numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"{path} {channels}")


# ----------------------------------------------------------------------------- the evaluation resize

ODD_SIZES = [(640, 427), (427, 640), (225, 224), (1, 1)]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_center_crop_resize_truncates_the_long_side(size):
    """Shorter side to 256, the longer to int(256 * long / short) (640x427 -> 383x256, where rounding gives 384),
    then the centre 224 at ((w - 224) // 2, (h - 224) // 2)."""
    w, h = size
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    short, long_ = min(w, h), max(w, h)
    rw, rh = (256, int(256 * long_ / short)) if w <= h else (int(256 * long_ / short), 256)
    if size == (640, 427):
        assert (rw, rh) == (383, 256)
    want = im.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - 224) // 2, (rh - 224) // 2
    want = want.crop((left, top, left + 224, top + 224))
    np.testing.assert_array_equal(np.asarray(serving.resize_image(im, 224, 256, Image.BICUBIC)), np.asarray(want))


@pytest.mark.parametrize("size", ODD_SIZES)
def test_preprocessing_equals_the_huggingface_convnext_processor(size, tmp_path):
    """predict's preprocessing of an HF-style CvT (shortest_edge 224, crop_pct 0.875, bicubic, ImageNet mean/std)
    against transformers' own ConvNext processor (its PIL backend) on a photo-like image of an odd size."""
    transformers = pytest.importorskip("transformers")
    config = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True, "do_rescale": True, "resample": 3,
              "size": {"shortest_edge": 224}, "image_mean": [0.485, 0.456, 0.406],
              "image_std": [0.229, 0.224, 0.225], "image_processor_type": "ConvNextImageProcessor"}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    try:
        processor = transformers.ConvNextImageProcessorPil.from_pretrained(tmp_path)
    except AttributeError:  # transformers < 5: the PIL processor is the default one
        processor = transformers.ConvNextImageProcessor.from_pretrained(tmp_path)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(w * 1000 + h)
    photo = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    photo = np.clip(photo + rng.integers(-20, 21, photo.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(buf.getvalue())

    ours = serving.preprocess(str(path), metadata.hf_preprocessing(config))
    with Image.open(path) as im:
        theirs = processor(images=im.convert("RGB"), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert ours.shape == theirs.shape == (224, 224, 3)
    assert float(np.max(np.abs(ours - theirs))) <= 1e-5
