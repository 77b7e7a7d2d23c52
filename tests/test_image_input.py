"""Image input for image-to-3D: matting, recentring, the reference view, and one clear error per bad image."""

import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from distill3d.engine.errors import UserError
from distill3d.engine.image_input import ImageInputError, foreground_box, matte
from distill3d.engine.reference_view import ReferenceViewConfig, load_reference_view


def rgba_object(h=80, w=120, box=(20, 60, 30, 70), color=(200, 40, 40)) -> np.ndarray:
    image = np.zeros((h, w, 4), np.uint8)
    t, b, l, r = box
    image[t:b, l:r, :3] = color
    image[t:b, l:r, 3] = 255
    return image


def test_rgba_is_recentred_to_the_foreground_fraction_and_written(tmp_path):
    path = tmp_path / "cut.png"
    iio.imwrite(path, rgba_object(box=(20, 61, 30, 70)))  # object 41 tall x 40 wide, off-centre in a 120x80 image
    view = load_reference_view(ReferenceViewConfig(image=str(path), size=100, elevation=12.0), run_dir=tmp_path / "run")
    assert view.rgba.shape == (100, 100, 4)
    top, bottom, left, right = foreground_box(view.rgba[..., 3])
    assert (bottom - top + 1) == pytest.approx(80, abs=1) and (right - left + 1) == pytest.approx(78, abs=1)  # 0.8 of 100
    assert (top + bottom) / 2 == pytest.approx(49.5, abs=1) and (left + right) / 2 == pytest.approx(49.5, abs=1)
    inside = view.rgba[top + 2 : bottom - 2, left + 2 : right - 2]
    assert torch.allclose(inside[..., :3], torch.tensor([200 / 255, 40 / 255, 40 / 255]).expand_as(inside[..., :3]), atol=1e-3)
    assert float(view.camera.elevation[0]) == 12.0 and float(view.camera.azimuth[0]) == 0.0
    written = iio.imread(tmp_path / "run" / "reference.png")
    assert written.shape == (100, 100, 4) and np.abs(written[..., 3].astype(float) / 255 - view.rgba[..., 3].numpy()).max() < 0.01
    # Straight alpha resized premultiplied: a disk's soft edge keeps its colour (transparent pixels are
    # black here, and would darken the edge if colour were resized unpremultiplied).
    yy, xx = np.mgrid[:90, :90]
    disk = np.zeros((90, 90, 4), np.uint8)
    disk[(yy - 45) ** 2 + (xx - 40) ** 2 < 30**2] = [200, 40, 40, 255]
    iio.imwrite(tmp_path / "disk.png", disk)
    disk_view = load_reference_view(ReferenceViewConfig(image=str(tmp_path / "disk.png"), size=64), None)
    edge = (disk_view.rgba[..., 3] > 0.05) & (disk_view.rgba[..., 3] < 0.95)
    assert bool(edge.any()) and torch.allclose(disk_view.rgba[edge][:, 0], torch.full((int(edge.sum()),), 200 / 255), atol=0.02)
    rgb, alpha = view.rgb_alpha(50)
    assert rgb.shape == (1, 50, 50, 3) and alpha.shape == (1, 50, 50, 1)


def test_keep_framing_pads_to_a_square_without_rescaling(tmp_path):
    path = tmp_path / "cut.png"
    iio.imwrite(path, rgba_object(h=64, w=64, box=(10, 30, 40, 60)))
    view = load_reference_view(ReferenceViewConfig(image=str(path), size=64, foreground_fraction=None), None)
    assert foreground_box(view.rgba[..., 3]) == (10, 29, 40, 59)


def test_rgb_on_a_plain_background_is_matted_by_the_border_colour(tmp_path):
    image = np.full((64, 64, 3), 245, np.uint8)  # near-white backdrop
    image[16:48, 20:44] = [30, 90, 200]
    image[26:38, 28:36] = 245  # a patch of the background colour INSIDE the object stays foreground
    rgba = matte(image.astype(np.float32) / 255, "auto")
    alpha = rgba[..., 3] > 0.5
    truth = np.zeros((64, 64), bool)
    truth[16:48, 20:44] = True
    assert (alpha == truth).all()
    path = tmp_path / "photo.jpg"
    iio.imwrite(path, image, quality=95)
    view = load_reference_view(ReferenceViewConfig(image=str(path), size=64, matting="border"), None)
    top, bottom, left, right = foreground_box(view.rgba[..., 3])
    assert bottom - top + 1 == pytest.approx(51, abs=2)  # longer side (32 px) -> 0.8 * 64


def test_auto_uses_alpha_only_when_it_has_transparency():
    opaque = np.ones((40, 40, 4), np.float32)
    opaque[..., :3] = 0.2
    opaque[10:30, 10:30, :3] = 0.9
    rgba = matte(opaque, "auto")  # all-opaque alpha carries no matte: the border colour is used
    assert rgba[0, 0, 3] == 0 and rgba[20, 20, 3] == 1
    with pytest.raises(ImageInputError, match="no transparent pixels"):
        matte(opaque, "alpha")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("not an image"), "cannot read .* as an image"),
        (lambda p: iio.imwrite(p, np.zeros((20, 64, 4), np.uint8), extension=".png"), "at least 32 pixels"),
        (lambda p: iio.imwrite(p, np.zeros((64, 64, 4), np.uint8), extension=".png"), "no foreground"),
        (lambda p: iio.imwrite(p, np.full((64, 64, 3), 90, np.uint8), extension=".png"), "no foreground"),  # a blank photo
    ],
)
def test_bad_images_are_one_clear_error(tmp_path, make, match):
    path = tmp_path / "input.png"
    make(path)
    with pytest.raises(ImageInputError, match=match):
        load_reference_view(ReferenceViewConfig(image=str(path), size=64), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "reference.png").exists()


def test_foreground_touching_every_border_and_busy_backgrounds(tmp_path):
    image = rgba_object(64, 64, (0, 64, 0, 64))
    image[30, 30, 3] = 0  # one transparent pixel: alpha is used, but the object fills the frame
    path = tmp_path / "full.png"
    iio.imwrite(path, image)
    with pytest.raises(ImageInputError, match="touches every border"):
        load_reference_view(ReferenceViewConfig(image=str(path), size=64), None)
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "busy.png", noise)
    with pytest.raises(ImageInputError, match="not a plain colour.*rembg"):
        load_reference_view(ReferenceViewConfig(image=str(tmp_path / "busy.png"), size=64), None)
    assert isinstance(ImageInputError("x"), UserError)


def test_rembg_missing_or_offline_is_a_clear_message(tmp_path, monkeypatch):
    image = np.full((64, 64, 3), 128, np.uint8)
    path = tmp_path / "photo.png"
    iio.imwrite(path, image)
    monkeypatch.setitem(sys.modules, "rembg", None)  # not installed
    with pytest.raises(ImageInputError, match=r"pip install \"distill3d\[matting\]\""):
        load_reference_view(ReferenceViewConfig(image=str(path), size=64, matting="rembg"), None)

    def offline(_image):
        raise ConnectionError("Failed to establish a new connection")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=offline))
    with pytest.raises(ImageInputError, match="downloads its matting model.*offline"):
        load_reference_view(ReferenceViewConfig(image=str(path), size=64, matting="rembg"), None)

    def cut(pil):  # a working rembg: returns RGBA with the centre kept
        from PIL import Image

        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[16:48, 16:48] = [128, 128, 128, 255]
        return Image.fromarray(rgba, "RGBA")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=cut))
    view = load_reference_view(ReferenceViewConfig(image=str(path), size=64, matting="rembg"), None)
    assert foreground_box(view.rgba[..., 3]) == pytest.approx((6, 57, 6, 57), abs=1)


def test_depth_file_follows_the_recentring(tmp_path):
    image = rgba_object(80, 80, (10, 50, 20, 60))
    iio.imwrite(tmp_path / "cut.png", image)
    depth = np.tile(np.linspace(1.0, 2.0, 80, dtype=np.float32), (80, 1))  # farther to the right
    np.save(tmp_path / "depth.npy", depth)
    view = load_reference_view(ReferenceViewConfig(image=str(tmp_path / "cut.png"), size=64, depth=str(tmp_path / "depth.npy")), None)
    top, bottom, left, right = foreground_box(view.rgba[..., 3])
    row = view.depth[(top + bottom) // 2, left + 1 : right]
    assert float(row[0]) == pytest.approx(1.0 + 21 / 80, abs=0.03) and float(row[-1]) == pytest.approx(1.0 + 58 / 80, abs=0.03)
    assert bool((row[1:] >= row[:-1] - 1e-5).all())
    disp = load_reference_view(ReferenceViewConfig(image=str(tmp_path / "cut.png"), size=64, depth=f"disparity:{tmp_path / 'depth.npy'}"), None)
    assert float(disp.depth[32, left + 1]) > float(disp.depth[32, right - 1])  # larger disparity = nearer
    with pytest.raises(UserError, match="does not exist"):
        load_reference_view(ReferenceViewConfig(image=str(tmp_path / "cut.png"), size=64, depth=str(tmp_path / "none.npy")), None)


def test_estimated_depth_without_the_model_is_a_clear_message(tmp_path, monkeypatch):
    iio.imwrite(tmp_path / "cut.png", rgba_object(64, 64, (10, 50, 10, 50)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="depth estimator 'Intel/dpt-hybrid-midas' is not available.*huggingface-cli download"):
        load_reference_view(ReferenceViewConfig(image=str(tmp_path / "cut.png"), size=64, depth="estimate"), None)
