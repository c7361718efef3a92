"""The augmentations as plain functions: mmseg parity, scale and crop statistics, cat_max_ratio, alignment, flip,
photometric distortion, bad samples."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from ocr_cluster.data import DataError, codec
from ocr_cluster.data import photometric as P, transforms as T
from ocr_cluster.data.synth import SynthSpec, palette, render

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
DATA = Path(__file__).parent / "data"


def _encoded(h: int = 96, w: int = 160, index: int = 0) -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    """Encoded PNG image and label, and their decoded arrays (BGR image, as the pipeline decodes)."""
    image, label = render(SynthSpec(size_hw=(h, w)), "train", index)
    image_b, label_b = codec.encode_image(image), codec.encode_label(label)
    return (image_b, label_b, *T.decode_pair(image_b, label_b, 6))


def _denorm(image: np.ndarray) -> np.ndarray:
    return image.transpose(1, 2, 0) * np.array(STD, np.float32) + np.array(MEAN, np.float32)


@pytest.mark.parametrize("old, target, expected", [  # expected values computed with mmcv.rescale_size
    ((2048, 1024), (1024, 512), (1024, 512)), ((2048, 1024), (3000, 1500), (3000, 1500)),
    ((683, 512), (2048, 512), (683, 512)), ((500, 375), (1229, 307), (409, 307)),
    ((375, 500), (2048, 512), (512, 683)), ((256, 256), (511, 511), (511, 511)), ((1000, 10), (100, 50), (100, 1))])
def test_rescale_size_matches_mmcv(old, target, expected):
    assert T.rescale_size(old[0], old[1], target) == expected


def test_random_resize_ratio_statistics():
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(4000):
        tw, th = T.sample_target_scale((2048, 1024), (0.5, 2.0), rng)
        w, h = T.rescale_size(2048, 1024, (tw, th))
        ratios.append(w / 2048)
        assert abs(w / h - 2.0) < 0.01  # aspect ratio kept
    ratios = np.array(ratios)
    assert ratios.min() >= 0.5 and ratios.max() < 2.0
    assert abs(ratios.mean() - 1.25) < 0.03  # U[0.5, 2.0)
    hist, _ = np.histogram(ratios, bins=6, range=(0.5, 2.0))
    assert hist.min() > 0.8 * len(ratios) / 6  # flat
    # an image of another size: the scale bounds its long and short side
    w, h = T.rescale_size(500, 375, (2048, 512))
    assert (w, h) == (683, 512)


def test_crop_is_always_crop_size_and_pads_with_ignore():
    image_b, label_b, _, _ = _encoded(40, 50)
    p = T.TrainParams(crop_hw=(64, 96), scale_wh=(50, 40), num_classes=6, ratio_range=(1.0, 1.0),
                      photometric=False, flip_prob=0.0)
    img, lab = T.train_transform(image_b, label_b, p, np.random.default_rng(0))
    assert img.shape == (3, 64, 96) and img.dtype == np.float32 and lab.shape == (64, 96) and lab.dtype == np.uint8
    assert (lab[40:, :] == 255).all() and (lab[:, 50:] == 255).all()  # padded label is ignore
    assert (img[:, 40:, :] == 0).all() and (img[:, :, 50:] == 0).all()  # padded image is 0 after normalising
    assert (lab[:40, :50] != 255).mean() > 0.9
    p = T.TrainParams(crop_hw=(32, 32), scale_wh=(160, 96), num_classes=6)
    image_b, label_b, _, _ = _encoded()
    for seed in range(20):
        img, lab = T.train_transform(image_b, label_b, p, np.random.default_rng(seed))
        assert img.shape == (3, 32, 32) and lab.shape == (32, 32)


def test_crop_offsets_are_uniform():
    rng = np.random.default_rng(1)
    offsets = np.array([T.crop_offsets((100, 200), (50, 50), rng) for _ in range(6000)])
    assert offsets[:, 0].min() == 0 and offsets[:, 0].max() == 50
    assert offsets[:, 1].min() == 0 and offsets[:, 1].max() == 150
    assert abs(offsets[:, 0].mean() - 25) < 1.5 and abs(offsets[:, 1].mean() - 75) < 3


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = np.zeros((200, 200), np.uint8)
    label[150:, 150:] = 1  # class 1 only in one corner (6 % of the image)
    label[:10, :] = 255
    image = np.zeros((200, 200, 3), np.uint8)

    def share_mixed(cat_max_ratio: float) -> float:
        rng = np.random.default_rng(0)
        mixed = 0
        for _ in range(400):
            _, lab = T.random_crop(image, label, (60, 60), cat_max_ratio, rng)
            counts = np.bincount(lab[lab != 255].ravel(), minlength=2)
            mixed += counts.min() > 0 and counts.max() / counts.sum() < 0.75
        return mixed / 400

    without, with_ratio = share_mixed(1.0), share_mixed(0.75)
    assert without < 0.1  # few random crops hold both classes with the larger under 75 %
    # the first draw and up to 10 re-draws: P = 1 - (1 - p)^11 where p is one draw's chance
    assert with_ratio > 3 * without and abs(with_ratio - (1 - (1 - without) ** 11)) < 0.08
    # a label where no crop qualifies: 11 draws, then the last one is kept
    rng = np.random.default_rng(3)
    flat = np.zeros((100, 100), np.uint8)
    _, lab = T.random_crop(np.zeros((100, 100, 3), np.uint8), flat, (50, 50), 0.75, rng)
    assert lab.shape == (50, 50)
    assert not T.crop_ok(np.array([255, 255, 0], np.uint8), 0.75)  # one class + ignore
    assert T.crop_ok(np.array([0, 1, 1, 255, 255, 255], np.uint8), 0.75)  # 2/3 < 0.75
    assert not T.crop_ok(np.array([0, 1, 1, 1], np.uint8), 0.75)  # 3/4 is not < 0.75


def test_label_and_image_stay_aligned():
    """The image is the label painted with the palette; after resize/crop/flip they still agree.

    Not to the pixel: OpenCV's INTER_NEAREST (mmseg's label resize) samples floor(x * scale), half a
    source pixel off the bilinear image's grid, so boundary pixels may disagree, as in mmseg.
    """
    _, label = render(SynthSpec(size_hw=(96, 160)), "train", 5)
    pal = np.array(palette(6), np.float32)
    image = np.array(palette(6) + [[0, 0, 0]] * 250, np.uint8)[label]
    p = T.TrainParams(crop_hw=(48, 48), scale_wh=(160, 96), num_classes=6, photometric=False)
    aligned, shifted = [], []
    for seed in range(12):
        img, lab = T.train_transform(codec.encode_image(image), codec.encode_label(label), p,
                                     np.random.default_rng(seed))
        nearest = np.argmin(((_denorm(img)[:, :, None, :] - pal) ** 2).sum(-1), -1)  # colour -> class
        valid = lab != 255
        aligned.append((nearest[valid] == lab[valid]).mean())
        shifted.append((nearest[valid] == np.roll(lab, 2, axis=1)[valid]).mean())
    assert min(aligned) > 0.95 and np.mean(aligned) > 0.975
    assert np.mean(aligned) > np.mean(shifted) + 0.03  # a 2-pixel misalignment is clearly worse


def test_flip_mirrors_and_swaps_left_right_classes():
    label = np.array([[14, 15, 16, 17], [18, 19, 0, 1]], np.uint8).repeat(8, 0).repeat(8, 1)
    image = np.random.default_rng(0).integers(0, 255, (*label.shape, 3), dtype=np.uint8)
    base = dict(crop_hw=(16, 32), scale_wh=(32, 16), num_classes=20, ratio_range=(1.0, 1.0), photometric=False,
                cat_max_ratio=1.0)
    keep_img, keep_lab = T.train_transform(codec.encode_image(image), codec.encode_label(label),
                                           T.TrainParams(flip_prob=0.0, **base), np.random.default_rng(1))
    flip_img, flip_lab = T.train_transform(codec.encode_image(image), codec.encode_label(label),
                                           T.TrainParams(flip_prob=1.0, **base), np.random.default_rng(1))
    assert np.allclose(flip_img, keep_img[:, :, ::-1])
    assert np.array_equal(flip_lab, keep_lab[:, ::-1])
    swapped = T.TrainParams(flip_prob=1.0, flip_swap=((14, 15), (16, 17), (18, 19)), **base)
    _, lip_lab = T.train_transform(codec.encode_image(image), codec.encode_label(label), swapped,
                                   np.random.default_rng(1))
    lut = T.swap_lut([(14, 15), (16, 17), (18, 19)])
    assert np.array_equal(lip_lab, lut[keep_lab[:, ::-1]])
    assert lip_lab[0, -1] == 15 and lip_lab[0, -9] == 14  # left arm (14) moved right and became right arm
    # flip frequency
    rng = np.random.default_rng(2)
    flips = sum(T.random_flip(image, label, 0.5, rng)[1][0, 0] != label[0, 0] for _ in range(2000))
    assert 900 < flips < 1100


def test_photometric_matches_mmseg_arithmetic():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)

    def convert(x, alpha=1.0, beta=0.0):  # mmseg PhotoMetricDistortion.convert
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    out = P.apply_photometric(image, P.PhotometricDraw(20.7, True, 1.3, None, None))
    assert np.array_equal(out, convert(convert(image, beta=20.7), alpha=1.3))
    out = P.apply_photometric(image, P.PhotometricDraw(-31.2, False, 0.6, None, None))
    assert np.array_equal(out, convert(convert(image, beta=-31.2), alpha=0.6))
    same = P.apply_photometric(image, P.PhotometricDraw(None, False, None, 1.0, 0))
    assert np.abs(same.astype(int) - image).mean() < 2  # an HSV round trip with no change is near identity
    grey = np.full((4, 4, 3), 100, np.uint8)
    hued = P.apply_photometric(grey, P.PhotometricDraw(None, False, None, 1.5, 18))
    assert np.array_equal(hued, grey)  # no saturation: hue and saturation change nothing
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 2] = 200  # BGR
    green = P.apply_photometric(red, P.PhotometricDraw(None, False, None, None, 60))  # +60 = +120 degrees
    assert green[0, 0].tolist() == [0, 200, 0]


def test_photometric_draws_follow_mmseg_probabilities():
    rng = np.random.default_rng(0)
    draws = [P.draw_photometric(rng) for _ in range(4000)]
    for attr in ("brightness", "contrast", "saturation", "hue"):
        fired = np.mean([getattr(d, attr) is not None for d in draws])
        assert 0.46 < fired < 0.54, attr
    assert 0.46 < np.mean([d.contrast_first for d in draws]) < 0.54
    b = [d.brightness for d in draws if d.brightness is not None]
    h = [d.hue for d in draws if d.hue is not None]
    assert -32 <= min(b) and max(b) <= 32 and min(h) == -18 and max(h) == 17  # numpy randint(-18, 18)


def test_normalize_and_pad():
    bgr = np.array([[[104, 116, 124]]], np.uint8).repeat(3, 0).repeat(2, 1)  # the mean colour, rounded, BGR
    out = T.normalize_image(bgr, MEAN, STD)
    assert out.shape == (3, 3, 2) and out.dtype == np.float32 and np.abs(out).max() < 0.01
    out = T.normalize_image(np.array([[[0, 0, 255]]], np.uint8), MEAN, STD)  # pure red in BGR
    assert np.allclose(out[:, 0, 0], [(255 - MEAN[0]) / STD[0], -MEAN[1] / STD[1], -MEAN[2] / STD[2]])
    img, lab = T.pad(out, np.zeros((3, 2), np.uint8), (4, 4))
    assert img.shape == (3, 4, 4) and (img[:, 3:, :] == 0).all() and (lab[:, 2:] == 255).all()


def test_train_chain_is_bit_exact_with_mmseg():
    """tests/data/mmseg_pipeline.npz: 4 PNG + 4 JPEG samples (48x80, 6 classes) run through mmseg 1.2.2's own
    LoadImageFromFile, LoadAnnotations, RandomResize((80, 48), (0.5, 2.0), keep_ratio), RandomCrop((32, 40),
    cat_max_ratio=0.75), RandomFlip(0.5), PhotoMetricDistortion after np.random.seed(seed), recorded with
    opencv-python 5.0.0.93. The same seeds through a RandomState give the same draws here."""
    ref = np.load(DATA / "mmseg_pipeline.npz")
    exact = T.TrainParams(crop_hw=(32, 40), scale_wh=(80, 48), num_classes=6, exact_resize=True)
    fast = T.TrainParams(crop_hw=(32, 40), scale_wh=(80, 48), num_classes=6)
    for k, seed in enumerate(ref["seeds"]):
        image, label = T.decode_pair(ref[f"image_bytes{k}"].tobytes(), ref[f"label_bytes{k}"].tobytes(), 6)
        out_img, out_lab = T.augment(image, label, exact, T.LegacyRandom(np.random.RandomState(int(seed))))
        assert np.array_equal(out_img, ref[f"mmseg_img{k}"]), k
        assert np.array_equal(out_lab, ref[f"mmseg_lab{k}"]), k
        # the default resamples only the crop window when that is cheaper: same crop and label,
        # image within a grey level before the photometric steps (which may stretch it a little)
        out_img, out_lab = T.augment(image, label, fast, T.LegacyRandom(np.random.RandomState(int(seed))))
        assert np.array_equal(out_lab, ref[f"mmseg_lab{k}"]), k
        diff = np.abs(out_img.astype(int) - ref[f"mmseg_img{k}"])
        assert diff.mean() < 0.3 and diff.max() <= 8, k
    assert ref[f"mmseg_img{4}"].shape == (26, 40, 3)  # one crop smaller than crop_size (padded later)
    # normalising and padding as SegDataPreProcessor: BGR -> RGB, (x - mean) / std, pad 0 / 255
    img, lab = T.pad(T.normalize_image(ref["mmseg_img4"], MEAN, STD), ref["mmseg_lab4"], (32, 40))
    rgb = ref["mmseg_img4"][:, :, ::-1].astype(np.float32)
    assert np.allclose(img[:, :26].transpose(1, 2, 0), (rgb - MEAN) / STD, atol=1e-5)
    assert (img[:, 26:] == 0).all() and (lab[26:] == 255).all()


def test_sample_rng_depends_on_seed_epoch_key_only():
    a = T.sample_rng(0, 1, "k").random(4)
    assert np.array_equal(a, T.sample_rng(0, 1, "k").random(4))
    for other in (T.sample_rng(1, 1, "k"), T.sample_rng(0, 2, "k"), T.sample_rng(0, 1, "k2")):
        assert not np.array_equal(a, other.random(4))


def test_bad_samples_raise_one_clear_error():
    image_b, label_b, _, _ = _encoded(32, 32)
    p = T.TrainParams(crop_hw=(16, 16), scale_wh=(32, 32), num_classes=6)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"^shard s: sample 'k': image cannot be decoded \(19 bytes"):
        T.train_transform(b"\x89PNG but not really", label_b, p, rng, where="shard s: sample 'k'")
    with pytest.raises(DataError, match=r"image cannot be decoded"):
        T.train_transform(image_b[: len(image_b) // 2], label_b, p, rng, where="x")  # truncated PNG
    bad = codec.encode_label(np.array([[0, 6], [9, 255]], np.uint8))
    small = codec.encode_image(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataError, match=r"sample 'k': label has values outside \[0, 6\) and 255: 6, 9$"):
        T.train_transform(small, bad, p, rng, where="shard s: sample 'k'")
    with pytest.raises(DataError, match=r"label is 2x2 but the image is 32x32"):
        T.eval_transform(image_b, bad, T.EvalParams(num_classes=10), where="x")


def test_eval_transform_keeps_the_label_and_resizes_the_image_like_mmseg_test():
    image_b, label_b, _, label = _encoded(60, 80)
    img, lab = T.eval_transform(image_b, label_b, T.EvalParams(num_classes=6, scale_wh=(2048, 120)))
    assert img.shape == (3, 120, 160) and np.array_equal(lab, label)  # short side to 120, label untouched
    img, lab = T.eval_transform(image_b, label_b, T.EvalParams(num_classes=6))
    assert img.shape == (3, 60, 80)


def test_window_resize_matches_the_full_resize():
    """The crop-window shortcut: labels identical to cv2.resize INTER_NEAREST, images within one grey level."""
    for size, crop, scale in (((96, 160), (32, 40), (160, 96)), ((64, 200), (48, 48), (200, 64)),
                              ((120, 90), (50, 30), (90, 120))):
        spec = SynthSpec(size_hw=size)
        for index in range(10):
            image, label = render(spec, "train", index)
            image = np.ascontiguousarray(image[:, :, ::-1])
            kwargs = dict(crop_hw=crop, scale_wh=scale, num_classes=6, photometric=False)
            a_img, a_lab = T.augment(image, label, T.TrainParams(exact_resize=True, **kwargs),
                                     np.random.default_rng(index))
            b_img, b_lab = T.augment(image, label, T.TrainParams(**kwargs), np.random.default_rng(index))
            assert np.array_equal(a_lab, b_lab)
            assert np.abs(a_img.astype(int) - b_img).max() <= 1
    big = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    full = T.resize(big, None, (170, 101))[0]
    assert np.abs(T.window_resize(big, (170, 101), 40, 77, 30, 60).astype(int) - full[40:70, 77:137]).max() <= 1
    assert np.array_equal(T.nearest_index(0, 101, 30, 101), np.floor(np.arange(101) * (30 / 101)).astype(int))


def _mmseg_photometric(img: np.ndarray, random: np.random.RandomState) -> np.ndarray:
    """mmseg 1.2.2's PhotoMetricDistortion.transform transcribed line by line (np.random -> `random`,
    mmcv.bgr2hsv / hsv2bgr -> cv2.cvtColor): the reference the fused lookup tables must equal bit for bit."""
    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=random.uniform(0.5, 1.5)) if random.randint(2) else x

    if random.randint(2):
        img = convert(img, beta=random.uniform(-32, 32))
    mode = random.randint(2)
    if mode == 1:
        img = contrast(img)
    if random.randint(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(0.5, 1.5))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if random.randint(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    return img


def test_fused_photometric_and_normalisation_equal_mmseg_step_by_step():
    """The fused tables (consecutive brightness/contrast in one pass, the trailing one folded into the
    normalisation tables) against mmseg's steps one by one, over every branch combination (400 seeds),
    on noise and on a smooth natural-like image, and on a strided crop view as the chain passes it."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    smooth = np.ascontiguousarray(render(SynthSpec(size_hw=(40, 56)), "train", 3)[0][:, :, ::-1])
    frame = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    branches = set()
    for image in (noise, smooth, frame[7:47, 11:67]):
        for seed in range(400):
            want = _mmseg_photometric(np.ascontiguousarray(image), np.random.RandomState(seed))
            draw = P.draw_photometric(T.LegacyRandom(np.random.RandomState(seed)))
            branches.add(tuple(v is not None for v in (draw.brightness, draw.contrast, draw.saturation, draw.hue))
                         + (draw.contrast_first,))
            assert np.array_equal(P.apply_photometric(image, draw), want), seed
            fused, tail = P.photometric_steps(image, draw)
            assert np.array_equal(T.normalize_image(fused, MEAN, STD, first=tail), T.normalize_image(want, MEAN, STD))
    assert len(branches) == 32  # every combination of the four steps and both orders was exercised


def test_train_transform_equals_augment_then_normalise_and_pad():
    """train_transform's deferred tail table gives the same tensor as augment (all tables applied) + normalise."""
    image_b, label_b, image, label = _encoded(96, 160)
    for exact in (True, False):
        p = T.TrainParams(crop_hw=(48, 64), scale_wh=(160, 96), num_classes=6, exact_resize=exact)
        for seed in range(40):
            got_img, got_lab = T.train_transform(image_b, label_b, p, np.random.default_rng(seed))
            crop, crop_lab = T.augment(image, label, p, np.random.default_rng(seed))
            want_img, want_lab = T.pad(T.normalize_image(crop, MEAN, STD), crop_lab, (48, 64))
            assert np.array_equal(got_img, want_img) and np.array_equal(got_lab, want_lab), (exact, seed)


def test_uint8_crops_normalised_in_torch_equal_the_float_pipeline():
    """The GPU-normalisation option: train_crop_uint8 + normalize_batch (torch, here on the CPU) give exactly
    train_transform's float32 tensors, padding included (ADE-like: crops smaller than crop_size are padded)."""
    import torch

    image_b, label_b, _, _ = _encoded(48, 64)
    p = T.TrainParams(crop_hw=(64, 64), scale_wh=(64, 48), num_classes=6)
    crops, valid, want_img = [], [], []
    for seed in range(24):
        img, lab, hw = T.train_crop_uint8(image_b, label_b, p, np.random.default_rng(seed))
        crops.append(img)
        valid.append(hw)
        assert np.array_equal(lab, T.train_transform(image_b, label_b, p, np.random.default_rng(seed))[1])
        want_img.append(T.train_transform(image_b, label_b, p, np.random.default_rng(seed))[0])
    assert {hw for hw in valid} != {(64, 64)}  # some crops were padded
    got = T.normalize_batch(torch.from_numpy(np.stack(crops)), valid, MEAN, STD)
    assert got.dtype == torch.float32 and got.shape == (24, 3, 64, 64)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.from_numpy(np.stack(want_img)))
    on_device = T.normalize_batch(torch.from_numpy(np.stack(crops)), torch.tensor(valid), MEAN, STD)
    assert torch.equal(on_device, got)  # valid sizes as a tensor (on the GPU: no host sync)
