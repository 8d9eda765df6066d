"""Images for the vision path: torchvision data sets, SimCLR's two-view augmentation, and the view-major collate.

==================  ==============================  ===================================================
``vision_dataset``  pre-training (``pretrain``)     linear evaluation (``train`` / ``test``)
==================  ==============================  ===================================================
``cifar10/100``     train (50,000)                  train / test (10,000)
``stl10``           train + unlabeled (105,000)     train (5,000) / test (8,000)
``fashion_mnist``   train (60,000), 1 channel       train / test (10,000)
``imagefolder``     ``data_root/train/CLASS/*``     ``data_root/train`` / ``data_root/test`` (or ``val``)
==================  ==============================  ===================================================

Fashion-MNIST can also be read offline from a folder holding just the four IDX ``.gz`` files (as in
``shared/data/vision/fashion-mnist``): :func:`fashion_mnist_root` decompresses them once into a cache, in the layout
torchvision expects. Only this module and :mod:`simcse_flat.models.vision` import torchvision.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from ..errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    """What the transforms need to know about a data set: its channels, native size and pixel statistics."""

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec(3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetSpec(3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "fashion_mnist": DatasetSpec(1, 28, (0.2860,), (0.3530,)),
    "imagefolder": DatasetSpec(3, 224, *_IMAGENET),
}
SPLITS = ("pretrain", "train", "test")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
)


# ---- data sets ------------------------------------------------------------------------------------------------------


def load_images(name: str, root: str | Path, split: str, download: bool = False, transform: Callable | None = None):
    """The torchvision data set ``name`` (a key of :data:`DATASETS`), ``split`` one of :data:`SPLITS`.

    Items are ``(image, label)``: PIL images unless ``transform`` says otherwise. A missing data set raises
    :class:`DataError` naming the folder and the two ways out.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train = split != "test"
    try:
        if name == "cifar10":
            return datasets.CIFAR10(root, train=train, transform=transform, download=download)
        if name == "cifar100":
            return datasets.CIFAR100(root, train=train, transform=transform, download=download)
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
            return datasets.STL10(root, split=stl_split, transform=transform, download=download)
        if name == "fashion_mnist":
            return datasets.FashionMNIST(fashion_mnist_root(root), train=train, transform=transform, download=download)
        if name == "imagefolder":
            return datasets.ImageFolder(_imagefolder_split(Path(root), train), transform=transform)
    except (RuntimeError, FileNotFoundError) as err:  # what torchvision raises for a missing or partial copy
        raise DataError(f"{name} not found under {root} ({err}); set download: true or point data_root at it") from err
    raise ValueError(f"unknown vision_dataset {name!r}; choose one of {sorted(DATASETS)}")


def _imagefolder_split(root: Path, train: bool) -> Path:
    names = ("train",) if train else ("test", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no {' or '.join(names)} folder in {root}")


def fashion_mnist_root(root: str | Path) -> Path:
    """torchvision's root for Fashion-MNIST: ``root`` itself, or, when ``root`` holds the four IDX ``.gz`` files,
    a cache folder with them decompressed into ``FashionMNIST/raw`` (torchvision only decompresses inside
    ``download()``, which checks md5s of the ``.gz`` files that re-packaged copies do not match).

    The cache is ``$SIMCSE_FLAT_CACHE`` (default ``~/.cache/simcse_flat``) / ``fashion_mnist`` / a hash of the
    source folder; a file is decompressed again only if its ``.gz`` is newer.
    """
    root = Path(root)
    if not all((root / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
        return root
    cache_home = Path(os.environ.get("SIMCSE_FLAT_CACHE", Path.home() / ".cache" / "simcse_flat"))
    cache = cache_home / "fashion_mnist" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        _gunzip_if_stale(root / f"{name}.gz", raw / name)
    return cache


def _gunzip_if_stale(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")  # renamed when complete: readers never see half a file
    with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, target)


# ---- transforms -----------------------------------------------------------------------------------------------------


def simclr_augmentation(spec: DatasetSpec, image_size: int, min_crop_scale: float = 0.08, jitter: float = 0.5):
    """SimCLR's augmentation (Chen et al., 2020, appendix A): random resized crop, horizontal flip, colour jitter
    (p = 0.8) and grayscale (p = 0.2), Gaussian blur (p = 0.5) only at 64 px and up (SimCLR drops it on CIFAR).

    One-channel images keep one channel and get brightness and contrast jitter only: saturation, hue and grayscale
    do nothing to a grey image. ``jitter`` is SimCLR's strength ``s``.
    """
    steps = [
        *_to_tensor(spec.channels),
        v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if spec.channels == 3:
        colour = v2.ColorJitter(0.8 * jitter, 0.8 * jitter, 0.8 * jitter, 0.2 * jitter)
        steps += [v2.RandomApply([colour], p=0.8), v2.RandomGrayscale(p=0.2)]
    else:
        steps.append(v2.RandomApply([v2.ColorJitter(0.8 * jitter, 0.8 * jitter)], p=0.8))
    if image_size >= 64:
        kernel = image_size // 10 * 2 + 1  # odd, about a tenth of the side, as SimCLR
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose([*steps, *_normalise(spec, spec.channels)])


def labelled_transform(spec: DatasetSpec, image_size: int, channels: int, augment: bool = False):
    """For evaluation: resize and centre-crop to the encoder's size, in its channels (a 3-channel encoder reads a
    grey data set as RGB). ``augment`` (fine-tuning) crops at random and flips instead."""
    if augment:
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*_to_tensor(channels), *geometry, *_normalise(spec, channels)])


def _to_tensor(channels: int) -> list:
    return [v2.ToImage(), v2.RGB() if channels == 3 else v2.Grayscale(num_output_channels=1)]


def _normalise(spec: DatasetSpec, channels: int) -> list:
    """Float in [0, 1], then the data set's mean and std, carried over to ``channels`` channels."""
    mean, std = spec.mean, spec.std
    if len(mean) != channels:  # grey data set read in RGB, or the reverse
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


# ---- training items -------------------------------------------------------------------------------------------------


class MultiViewDataset(Dataset):
    """Each item is ``views`` independent augmentations of one image, ``(V, C, H, W)``, with the image's index as
    ``idx`` (the per-sample key of EMC² and SogCLR); labels are dropped."""

    def __init__(self, images: Dataset, transform: Callable, views: int = 2) -> None:
        self.images, self.transform, self.views = images, transform, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image, _ = self.images[index]
        views = torch.stack([self.transform(image) for _ in range(self.views)])
        return {"pixel_values": views, "idx": index, "key": image_key(image)}


def image_key(image) -> int:
    """A 64-bit key of the image's pixels: two items with one key are the same picture, never each other's
    negative (a PIL image, a NumPy array or a tensor)."""
    raw = image.contiguous().cpu().numpy().tobytes() if isinstance(image, torch.Tensor) else image.tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def collate_views(items: list[dict]) -> dict[str, torch.Tensor]:
    """``{"pixel_values": (V*B, C, H, W)`` view-major (all first views, then all second views), ``"sample_ids": (B,)}``:
    the layout :func:`simcse_flat.views.split_views` reads, as the text collator gives."""
    stacked = torch.stack([item["pixel_values"] for item in items])  # (B, V, C, H, W)
    return {
        "pixel_values": stacked.transpose(0, 1).flatten(0, 1),
        "sample_ids": torch.tensor([item["idx"] for item in items], dtype=torch.long),
        "sample_keys": torch.tensor([item["key"] for item in items], dtype=torch.long),
    }


def collate_one_view(items: list[dict], views: list[int]) -> dict[str, torch.Tensor]:
    """``{"pixel_values": (B, C, H, W)}``: view ``views[i]`` of item ``i`` alone, what EMC² re-encodes for its chain
    negatives (images have two views and no hard negative: every request is view 1, the second augmentation)."""
    return {"pixel_values": torch.stack([item["pixel_values"][view] for item, view in zip(items, views)])}


def subset(images: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """``limit`` items drawn once at random (a function of ``seed``), in their original order; all if ``None``.

    Random, not the first ``limit``: an ImageFolder lists its images class by class."""
    if limit is None or limit >= len(images):
        return images
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(images, sorted(picked.tolist()))
