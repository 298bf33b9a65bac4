"""Images with holes: the pretraining input pipeline on top of the shared data readers.

Crops, flips and masks are drawn from a generator seeded by (seed, epoch, index), and the sample
order by (seed, epoch): the batch at step t is a pure function of the config, whatever the number of
loader workers or DDP ranks, and whether or not the run was resumed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pretrain.data.images import IMAGENET_MEAN, IMAGENET_STD
from pretrain.masks import apply_mask, make_mask


def sample_generator(*keys: int) -> torch.Generator:
    """A generator seeded from a tuple of ints (large odd multipliers keep nearby tuples apart)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) * 2_654_435_761) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


def normalize(image01: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> mean-centred, unit-ish variance; 0 is the dataset mean colour."""
    mean = torch.tensor(IMAGENET_MEAN, device=image01.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image01.device).view(3, 1, 1)
    return (image01 - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`, clamped to [0, 1]; works on (3, H, W) and (B, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """Keep the aspect ratio (squashing to a square is a known reimplementation pitfall)."""
    w, h = image.size
    scale = short / min(w, h)
    if abs(scale - 1) < 1e-6:
        return image
    return image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)


def crop_and_flip(image: Image.Image, resize: int, crop_size: int, g: torch.Generator, train: bool) -> torch.Tensor:
    """The image resized to a `resize` short side, then a random crop of `crop_size` and a coin-flip mirror drawn
    from `g` when `train`, else the centre crop: a normalised (3, S, S) tensor."""
    image = resize_short_side(image, resize)
    w, h, s = image.width, image.height, crop_size
    if train:
        top = int(torch.randint(h - s + 1, (), generator=g))
        left = int(torch.randint(w - s + 1, (), generator=g))
    else:
        top, left = (h - s) // 2, (w - s) // 2
    x = TF.to_tensor(image.crop((left, top, left + s, top + s)))  # (3, S, S) in [0, 1]
    if train and torch.rand((), generator=g).item() < 0.5:
        x = x.flip(-1)
    return normalize(x)


class InpaintingDataset(Dataset):
    """Wraps a dataset of PIL images: returns (masked image, mask, original), or None for a bad file.

    `images[i]` may be a PIL image, an `(image, target)` pair (the VOC readers) or None (a file the
    reader skipped); None passes through for `skip_none_collate` to count.
    """

    def __init__(self, images: Dataset, crop_size: int = 227, resize: int = 256, mask: str = "random_region",
                 fraction: float = 0.25, seed: int = 0, train: bool = True,
                 shapes: Sequence[torch.Tensor] | None = None) -> None:
        self.images, self.crop_size, self.resize = images, crop_size, resize
        self.mask, self.fraction, self.seed, self.train = mask, fraction, seed, train
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)  # StreamSampler gives (epoch, index)
        item = self.images[index]
        image = item[0] if isinstance(item, tuple) else item
        if image is None:
            return None
        # Held-out samples get the same crop and mask every epoch, so evaluations are comparable.
        g = sample_generator(self.seed, epoch if self.train else -1, index)
        x = crop_and_flip(image, self.resize, self.crop_size, g, self.train)  # (3, S, S), normalised
        mask = make_mask(self.mask, self.crop_size, self.fraction, g, self.shapes)  # (S, S) bool
        return {"input": apply_mask(x, mask), "mask": mask, "target": x}


class StreamSampler(Sampler[tuple[int, int]]):
    """An endless stream of (epoch, index): a seeded permutation per epoch, epochs back to back.

    Global position p is sample `perm_e[p % n]` of epoch e = p // n. Rank r of `world_size` takes
    positions start + r, start + r + world_size, ...; so at every step the ranks' batches together
    are exactly the global batch one process would draw, and resuming at step t is `start = t * B`.
    One DataLoader iterator serves the whole run: no per-epoch worker restarts, no `set_epoch`.
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.start, self.rank, self.world_size = n, seed, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        epoch, perm = -1, None
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                perm = torch.randperm(self.n, generator=sample_generator(self.seed, epoch)).tolist()
            yield epoch, perm[position % self.n]
            position += self.world_size
