"""crop_flip and Normalize: exact semantics checked against a brute-force reference."""

import torch

from nmsparse.app.data.transforms import CropFlip, Normalize, crop_flip


def windows(image: torch.Tensor, padding: int, flip: bool) -> list[torch.Tensor]:
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flip:
                out.append(crop.flip(-1))
    return out


def test_every_output_is_a_padded_crop_or_its_mirror():
    images = torch.randint(1, 256, (64, 3, 6, 5), dtype=torch.uint8)
    out = crop_flip(images, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    moved = 0
    for image, result in zip(images, out, strict=True):
        assert any(torch.equal(result, cand) for cand in windows(image, 2, True))
        moved += not torch.equal(result, image)
    assert moved > 50  # 1 - 1/50 of them should move or flip


def test_no_padding_no_flip_is_identity_and_flip_only_mirrors():
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(crop_flip(images, padding=0, flip=False), images)
    out = CropFlip(padding=0, flip=True)(images, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_float_images_and_generator_determinism():
    images = torch.rand(8, 2, 7, 7)
    a = crop_flip(images, padding=3, flip=True, generator=torch.Generator().manual_seed(5))
    b = crop_flip(images, padding=3, flip=True, generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_normalize():
    norm = Normalize((0.5, 0.25), (0.5, 0.125))
    images = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    out = norm(images)
    expected = torch.tensor([[[[-1.0, 1.0]], [[-0.4, 1.2]]]])
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32
