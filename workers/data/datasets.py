"""Datasets as tensors: each split is one uint8 tensor [N, C, H, W] plus int64 labels, ready for the GPU.

No DataLoader: CIFAR-10 and Fashion-MNIST fit in device memory many times over, so the training loop
indexes one resident tensor. Splits are fixed by `split_seed`: the validation split is carved from
the official training set, the official test set is the test split.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from core.errors import SearchsvcError
from core.records import MAX_SEED, canonical_json
from workers.data import readers, sources, streaming
from workers.data.streaming import Split
from workers.models.inputs import InputSpec

DatasetName = Literal["cifar10", "fashion_mnist", "imagefolder", "synthetic", "python", "shards"]
STREAMABLE = ("imagefolder", "shards", "python")  # the sources whose data may be larger than memory
RESIZED_ON_READ = ("imagefolder", "shards")  # image_size applied as each image is decoded
# Sources read in blocks (Parquet row groups): a split carved or cut from one keeps its examples in storage order,
# not the seed's shuffle — evaluation and the teacher's logits read a split in its order, which must not read a
# block per example; resident too, so both paths hold the same examples in the same order (the teacher's cached
# logits, stored once for both, are looked up by example index).
STORAGE_ORDER = ("shards",)
MAX_IMAGE_SIZE = 4096  # pixels a side: an image resized (or made) larger is a typo, not a dataset
MAX_IMAGE_VALUES = 3 * MAX_IMAGE_SIZE ** 2  # channels x height x width of one image: an RGB image of 4096 px
STD_RANGE, MEAN_RANGE = (1e-3, 1e3), (-1e3, 1e3)  # 0..1 scale: a smaller std overflows the normalised pixels


@dataclass(frozen=True)
class SyntheticConfig:
    """Class-dependent patterns plus noise: learnable, tiny, no files needed (tests, smoke runs)."""

    num_classes: int = field(default=4, metadata={"min": 2, "help": "number of classes"})
    channels: int = field(default=1, metadata={"min": 1, "help": "image channels"})
    image_size: int = field(default=16, metadata={"min": 4, "max": MAX_IMAGE_SIZE, "help": "height = width, pixels"})
    train_size: int = field(default=1024, metadata={"min": 2, "help": "images in the official train split"})
    test_size: int = field(default=256, metadata={"min": 1, "help": "images in the test split"})
    noise: float = field(default=0.35, metadata={"min": 0, "help": "noise std relative to the pattern range"})


@dataclass(frozen=True)
class DatasetConfig:
    """Which data, where it is, and how it is split."""

    name: DatasetName = "fashion_mnist"
    root: str | None = field(default=None, metadata={
        "help": "folder with the files (imagefolder, shards: also s3://bucket/prefix, read through the store's "
                "endpoint); null: search known places"})
    subset: int | float | None = field(
        default=None, metadata={"gt": 0, "help": "int: training images kept; float in (0, 1]: fraction of each split"})
    val_fraction: float = field(default=0.1, metadata={
        "min": 0, "lt": 1, "help": "share of train held out as validation (not used where the source has its own)"})
    split_seed: int = field(default=0, metadata={
        "min": 0, "max": MAX_SEED, "help": "seed of the train/val split and subset"})
    image_size: int | None = field(default=None, metadata={
        "min": 4, "max": MAX_IMAGE_SIZE,
        "help": "resize every image to this side, pixels (a model trained at another size); null: as stored. One "
                "image fed to the model holds at most 3 x 4096 x 4096 values (channels x side x side)"})
    download: bool = field(default=True, metadata={"help": "let torchvision download if no files are found"})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    factory: str | None = field(default=None, metadata={
        "omit_default": True, "help": "name: python — your own data: package.module:function returning {train: "
                                      "Dataset, test: Dataset, val: Dataset (optional)} of (input, target) pairs"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "omit_default": True, "help": "keyword arguments of dataset.factory, e.g. {root: /data/mine}"})
    fingerprint: str | None = field(default=None, metadata={
        "omit_default": True, "help": "set by a run, not in configs: what the files of an imagefolder or shards "
                                      "root are (a digest of names and sizes; on S3 ETags too), so other or changed "
                                      "files are other data to every identity; a worker whose files differ stops"})
    # How the data is held, not what it is: none of these is part of a candidate's or a teacher's identity.
    in_memory: bool | Literal["auto"] = field(default="auto", metadata={
        "omit_default": True, "help": "imagefolder, shards and python: true decodes every split into memory "
                                      "(fast: indexed on the device), false streams batches from the files or "
                                      "your Dataset, auto streams when the decoded data passes memory_share"})
    memory_share: float = field(default=0.25, metadata={
        "omit_default": True, "gt": 0, "max": 1, "help": "in_memory auto: the share of the memory available "
                                                         "that decoded data may take in each process holding it"})
    bad_files: Literal["stop", "skip"] = field(default="stop", metadata={
        "omit_default": True, "help": "imagefolder, shards: a file (a shard's row) that is no readable image stops "
                                      "the run naming it (stop), or is left out (skip; streamed: the next "
                                      "readable one stands in)"})
    workers: int = field(default=2, metadata={
        "omit_default": True, "min": 0, "max": 64, "help": "streamed data: processes decoding batches beside each "
                                                           "training process (0: in it)"})
    # The input contract of a model trained elsewhere (teacher.model): its normalisation and channels.
    mean: tuple[float, ...] | None = field(default=None, metadata={
        "omit_default": True, "help": "per-channel mean the model was trained with (0..1 scale; each in [-1000, "
                                      "1000]); null: this data's"})
    std: tuple[float, ...] | None = field(default=None, metadata={
        "omit_default": True, "help": "per-channel std the model was trained with (each in [0.001, 1000]); null: "
                                      "this data's"})
    channels: int | None = field(default=None, metadata={
        "omit_default": True, "min": 1,
        "help": "channels fed to the model: 3 repeats a 1-channel image (grayscale data, RGB model); null: as stored"})

    def __post_init__(self) -> None:
        if (self.name == "python") != (self.factory is not None):
            raise ValueError("factory: name: python takes your dataset from dataset.factory (package.module:function)"
                             if self.factory is None else "factory: only with name: python")
        if self.kwargs and self.factory is None:
            raise ValueError("kwargs: only with dataset.factory (name: python)")
        if self.in_memory is False and self.name not in STREAMABLE:
            raise ValueError(f"in_memory: {self.name} is always held in memory; {', '.join(STREAMABLE)} data "
                             f"can stream")

        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (not value or (key == "std" and min(value) <= 0)):
                raise ValueError(f"{key}: must be a non-empty list{' of positive numbers' if key == 'std' else ''}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean: mean and std are given together (the model's normalisation), or neither")
        for key, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            for i, value in enumerate(getattr(self, key) or ()):
                if not low <= value <= high:
                    raise ValueError(f"{key}[{i}]: must be in [{low:g}, {high:g}] (0..1 scale), got {value:g}")
        if isinstance(self.subset, float) and not 0 < self.subset <= 1:
            raise ValueError(f"subset: a fraction (a float) must be in (0, 1], got {self.subset:g}; an integer keeps "
                             "that many training images")
        self._check_image_values()

    def identity(self) -> DatasetConfig:
        """What the data is, not where its files are nor how it is held: the part of the config identities
        (spec_hash, teacher_hash) are taken of."""
        return replace(self, root=None, download=True, in_memory="auto", memory_share=0.25, workers=2)

    def __hash__(self) -> int:  # `kwargs` is a dict: hashed by its canonical JSON, so specs stay hashable
        return hash(canonical_json(self))

    def _check_image_values(self) -> None:
        """One image of the data as the model takes it stays below MAX_IMAGE_VALUES (a memory bound per image)."""
        shape = input_shape(self)
        if shape is None or shape.values <= MAX_IMAGE_VALUES:
            return
        key = "channels" if self.channels is not None else "synthetic.channels" if self.name == "synthetic" \
            else "image_size"
        channels, side = shape.channels, shape.shape[-1]
        raise ValueError(f"{key}: {channels} channels of {side} x {side} px make one image of "
                         f"{channels * side * side} values; at most {MAX_IMAGE_VALUES} (3 x {MAX_IMAGE_SIZE} x "
                         f"{MAX_IMAGE_SIZE})")


@dataclass
class Splits:
    """Train / val / test of one dataset, plus what a model needs to know about them. Each split is resident —
    (inputs, labels) tensors indexed on the device, the fast path — or streamed from its source batch by batch
    (workers.data.streaming; read it through that module's functions, which take either). Inputs are uint8
    images (normalised with `mean` and `std` on the way into a model) or floating-point inputs the user's code
    prepared (taken as they are)."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    sources: dict[str, str] = field(default_factory=dict)  # split → where it came from (run.json)
    fingerprint: str | None = None  # what the files are (imagefolder, shards: DatasetConfig.fingerprint)
    tokens: int | None = None  # inputs that are token ids: the vocabulary's size (the largest id + 1)
    parts: tuple[str, ...] | None = None  # inputs of several parts, packed [P, L]: the model's keyword arguments

    @property
    def inputs(self) -> InputSpec:
        """One example's input as the model receives it (the training split's)."""
        return InputSpec(tuple(streaming.input_shape(self.train)), self.tokens, self.parts)

    @property
    def streamed(self) -> bool:
        """Whether the training split is read from its source batch by batch (not resident)."""
        return isinstance(self.train, streaming.Streamed)

    def to(self, device: torch.device | str) -> Splits:
        """A copy with every resident tensor on `device` (the fast path keeps data resident on the GPU); a
        streamed split delivers its batches there."""
        move = lambda split: split.to(device) if isinstance(split, streaming.Streamed) else \
            (split[0].to(device), split[1].to(device))  # noqa: E731
        return Splits(self.name, move(self.train), move(self.val), move(self.test), self.num_classes,
                      self.mean, self.std, self.sources, self.fingerprint, self.tokens, self.parts)

    def sizes(self) -> dict[str, int]:
        return {name: streaming.count(getattr(self, name)) for name in ("train", "val", "test")}

    def provenance(self) -> dict[str, dict[str, Any]]:
        """Each split's source and size, as run.json records them."""
        return {name: {"from": self.sources.get(name, self.name), "size": size} for name, size in self.sizes().items()}


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images → float, standardised per channel (runs on whatever device the images are on); floating-point
    inputs (a python dataset's, normalised by the user's own transform) and token ids (integers) as they are."""
    if images.is_floating_point():
        return images.float()
    if images.dtype != torch.uint8:  # token ids: the model embeds them
        return images
    m, s = channel_stats_on(tuple(mean), tuple(std), images.device)
    return (images.float() / 255.0 - m) / s


@functools.lru_cache(maxsize=32)
def channel_stats_on(mean: tuple[float, ...], std: tuple[float, ...],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean` and `std` as [1, C, 1, 1] tensors on `device`, built once per device: a fresh tensor per
    step would be a host-to-device copy, and a host sync, twice per training step."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def _take(pair: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pair[0][index].contiguous(), pair[1][index].contiguous()


def load_dataset(config: DatasetConfig, endpoint: str | None = None) -> Splits:
    """Load `config`'s dataset into three fixed splits (same seed → same split, on any machine). `endpoint`: the
    S3 endpoint data under an s3:// root is read through (the run's store's; else the environment's)."""
    if config.name not in readers.LOADERS:
        raise SearchsvcError(f"dataset.name: unknown dataset {config.name!r}; choose one of "
                             f"{', '.join(readers.LOADERS)}")
    found = readers.LOADERS[config.name](config, endpoint)
    loaded = found if isinstance(found, sources.Loaded) else sources.Loaded.of(found)
    n_all = streaming.count(loaded.train)
    gen = torch.Generator().manual_seed(config.split_seed)
    order = torch.randperm(n_all, generator=gen)
    n_val = 0 if loaded.val is not None else int(round(config.val_fraction * n_all))
    if n_all - n_val < 1:
        raise SearchsvcError(f"dataset.val_fraction: {config.val_fraction} leaves no training images")
    val_index, train_index = order[:n_val], order[n_val:]
    test_index = torch.randperm(streaming.count(loaded.test), generator=gen)
    if loaded.val is not None:  # the source's own validation split, in an order fixed by the seed
        val_index = torch.randperm(streaming.count(loaded.val), generator=gen)
    if config.subset is not None:
        n_train = len(train_index)
        train_index, val_index, test_index = (index[: _subset_size(config.subset, len(index), n_train)]
                                              for index in (train_index, val_index, test_index))
    # The model's input contract applies to the images kept (after `subset`), one split at a time.
    val_from = loaded.train if loaded.val is None else loaded.val
    train, val, test = (_pick(split, index, config) for split, index in (
        (loaded.train, train_index), (val_from, val_index), (loaded.test, test_index)))
    channels = streaming.input_shape(train)[0]
    tokens = _vocabulary(train, val, test)
    if tokens is not None:  # token ids: nothing to normalise
        mean, std = (0.0,), (1.0,)
    elif config.mean is not None:  # the normalisation the model was trained with, not this data's own
        mean, std = _stated_stats(config, channels)
    elif _floating(train):  # inputs the user's code normalised: taken as they are
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        mean, std = _channel_stats(_stats_sample(train))
    return Splits(config.name, train, val, test, loaded.classes, mean, std, _where(config, loaded),
                  loaded.fingerprint, tokens, loaded.parts)


def _vocabulary(*splits: streaming.Split) -> int | None:
    """The largest token id + 1 of integer inputs (token ids, held in memory), None for images and floats."""
    first = splits[0]
    dtype = first.dtype if isinstance(first, streaming.Streamed) else first[0].dtype
    if dtype.is_floating_point or dtype == torch.uint8:
        return None
    if any(isinstance(split, streaming.Streamed) for split in splits):
        raise SearchsvcError("dataset.in_memory: token ids are held in memory (their vocabulary is read from "
                             "every example); set dataset.in_memory: true")
    return 1 + max(int(split[0].max()) for split in splits if len(split[0]))


STATS_SAMPLE = 4096  # streamed training images the channel statistics are taken from (all of a smaller split)


def _pick(split: streaming.Split, index: torch.Tensor, config: DatasetConfig) -> streaming.Split:
    """The examples at `index`, as the model takes them (a resident split's images converted here; a streamed
    one's are read as they are: channels and image_size are its reader's business). Data read in blocks keeps
    them in storage order, resident or streamed alike (STORAGE_ORDER)."""
    if config.name in STORAGE_ORDER:
        index = index.sort().values
    if isinstance(split, streaming.Streamed):
        if config.channels is not None and config.channels != split.shape[0]:
            raise SearchsvcError(f"dataset.channels: streamed data is read as its source gives it ({split.shape[0]} "
                                 f"channels); convert in your dataset, or set dataset.in_memory: true")
        if config.image_size is not None and config.image_size != split.shape[-1]:  # an image folder's: resized
            raise SearchsvcError(f"dataset.image_size: streamed data is read as its source gives it ({split.shape[-1]}"
                                 f" px); resize in your dataset, or set dataset.in_memory: true")
        return split.subset(index)
    x, y = _take(split, index)
    return _model_input(x, config), y


def _floating(split: streaming.Split) -> bool:
    return split.dtype.is_floating_point if isinstance(split, streaming.Streamed) else split[0].is_floating_point()


def _stats_sample(split: streaming.Split) -> torch.Tensor:
    """The training images the channel statistics are taken from: all of a resident split; of a streamed one,
    the first STATS_SAMPLE of a fixed shuffle (all, in order, when it has no more)."""
    if not isinstance(split, streaming.Streamed):
        return split[0]
    n = len(split)
    index = torch.arange(n) if n <= STATS_SAMPLE else \
        streaming.epoch_order(split, torch.Generator().manual_seed(0))[:STATS_SAMPLE]
    return streaming.take(split, index)[0]


def _where(config: DatasetConfig, loaded: sources.Loaded) -> dict[str, str]:
    """Each split's source as run.json states it: the reader's own words, validation carved or given."""
    where = {"train": loaded.sources.get("train", f"{config.name} train"),
             "test": loaded.sources.get("test", f"{config.name} test")}
    if loaded.val is not None:
        where["val"] = loaded.sources.get("val", f"{config.name} val")
    else:
        where["val"] = f"{config.val_fraction:.0%} of {where['train']} (val_fraction, split_seed {config.split_seed})"
        where["train"] = f"the rest of {where['train']}"
    if config.subset is not None:
        where = {name: f"{text}, subset {config.subset}" for name, text in where.items()}
    return where


# (channels, side in pixels) of the datasets whose files have one shape
_SHAPES = {"fashion_mnist": (1, 28), "cifar10": (3, 32)}


def input_shape(config: DatasetConfig) -> InputSpec | None:
    """The images a model will be fed, known from the config alone (None: only the data can tell — an
    imagefolder without image_size, a dataset from the user's code)."""
    channels, side = (config.synthetic.channels, config.synthetic.image_size) if config.name == "synthetic" \
        else _SHAPES.get(config.name, (None, None))
    channels, side = config.channels or channels, config.image_size or side
    return InputSpec.image(channels, side) if channels and side else None


def _model_input(images: torch.Tensor, config: DatasetConfig) -> torch.Tensor:
    """Images as the model takes them: `channels` (a single channel repeated) and `image_size` (resized;
    imagefolder resizes while reading)."""
    if images.dim() != 4 and (config.channels is not None or config.image_size is not None):
        key = "channels" if config.channels is not None else "image_size"
        raise SearchsvcError(f"dataset.{key}: the inputs are of shape {'x'.join(map(str, images.shape[1:]))}, "
                             f"not images [C, H, W]: nothing to convert")
    if config.channels is not None and config.channels != images.shape[1]:
        if images.shape[1] != 1:
            raise SearchsvcError(f"dataset.channels: {config.channels} channels cannot be made from "
                                 f"{images.shape[1]}-channel images (only a single channel is repeated)")
        images = images.expand(-1, config.channels, -1, -1).contiguous()
    if config.image_size is not None and config.name not in RESIZED_ON_READ and images.shape[-1] != config.image_size:
        size = (config.image_size, config.image_size)
        resize = lambda chunk: torch.nn.functional.interpolate(  # noqa: E731
            chunk.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        as_stored = (lambda x: x) if images.is_floating_point() else \
            (lambda x: x.round_().clamp_(0, 255).to(torch.uint8))
        images = torch.cat([  # 1,024 images at a time: the float copy stays small whatever the target size
            as_stored(resize(chunk)) for chunk in images.split(1024)]) if len(images) \
            else images.new_zeros((0, images.shape[1], *size))
    return images


def _stated_stats(config: DatasetConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """dataset.mean / std, one value per channel the model sees (one value is used for every channel)."""
    mean, std = tuple(config.mean or ()), tuple(config.std or ())
    if len(mean) == 1 and len(std) == 1:
        return mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise SearchsvcError(f"dataset.mean: {len(mean)} values (std: {len(std)}) for {channels}-channel images; "
                             f"give one per channel, or one for all")
    return mean, std


def _subset_size(subset: float, size: int, n_train: int) -> int:
    """How many of a split's `size` images a subset keeps: the same share of every split, rounded up.

    An int subset keeps exactly that many training images; the arithmetic is integer so that float
    rounding never adds one.
    """
    if size == 0:
        return 0
    if isinstance(subset, float):
        if not 0 < subset <= 1:
            raise SearchsvcError(f"dataset.subset: a fraction must be in (0, 1], got {subset}")
        return max(1, math.ceil(subset * size))
    if subset >= n_train:
        return size
    return max(1, -(-size * subset // n_train))  # ceil(size * subset / n_train)


STATS_CHUNK = 256  # images converted to float at a time: a float copy of a whole split is 4x its bytes


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images on the 0..1 scale (from the training split only), summed
    STATS_CHUNK images at a time in float64: memory stays a chunk's, not a float copy of the split (4,000 images
    of 160 px took 5.8 GiB at the peak that way)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(STATS_CHUNK):
        x = chunk.to(torch.float64).transpose(0, 1).reshape(channels, -1)
        total += x.sum(dim=1)
        squares += x.square().sum(dim=1)
    n = images.numel() // channels
    mean = total / n
    var = (squares - n * mean.square()) / max(1, n - 1)
    std = (var.clamp_min(0).sqrt() / 255.0).clamp_min(1e-3)
    return tuple(round(v, 6) for v in (mean / 255.0).tolist()), tuple(round(v, 6) for v in std.tolist())

