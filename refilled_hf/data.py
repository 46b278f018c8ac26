"""Image-classification data through `datasets`: loading (Hub id or local files), column
detection, class selection and remapping, few-shot subsampling, a stratified validation
split carved from training data, and timm transforms.

Selections only build index arrays over the Arrow table (``Dataset.select``), so nothing
is rewritten or cached to disk; images are decoded once into memory when they are small
(CIFAR-sized), so decoding never limits training speed.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import timm
import torch
from PIL import Image
from torchvision import transforms as T

__all__ = [
    "CLASS_PRESETS",
    "ClassificationData",
    "DataError",
    "ImageClassificationDataset",
    "build_transform",
    "detect_columns",
    "load_classification_data",
    "load_raw_dataset",
    "parse_class_selection",
]

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("fine_label", "label")

#: Named class selections. CIFAR-100 cross-task protocol of the paper: the teacher on
#: the first 50 classes, the student on the other 50 (disjoint), or on a 50-class window
#: shifted by 10..40 classes (partial overlap of 40..10 classes with the teacher).
CLASS_PRESETS: dict[str, str] = {
    "cifar100-first-half": "0-49",
    "cifar100-second-half": "50-99",
    "cifar100-shift-10": "10-59",
    "cifar100-shift-20": "20-69",
    "cifar100-shift-30": "30-79",
    "cifar100-shift-40": "40-89",
}

# Below this many decoded bytes, images are decoded once and kept in memory.
_PRELOAD_BYTES = 2 << 30


class DataError(ValueError):
    """Data that cannot be used as asked (the message names the problem and the fix)."""


# --------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=4)
def load_raw_dataset(name_or_path: str, config_name: str | None = None) -> datasets.DatasetDict:
    """A `DatasetDict` from a Hub id, a local folder (parquet files named by split, the
    Hub layout, or anything `datasets.load_dataset` reads) or a single parquet file
    (taken as the ``train`` split). Cached per process: selections never modify it."""
    path = Path(name_or_path)
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files={"train": str(path)})
        if path.is_dir():
            return datasets.load_dataset(str(path), config_name)
        if name_or_path.startswith((".", "/")) or name_or_path.endswith(".parquet"):
            raise DataError(f"Data set {name_or_path!r} not found: no such file or folder.")
        return datasets.load_dataset(name_or_path, config_name)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - network, missing repo, unreadable files
        raise DataError(
            f"Data set {name_or_path!r} could not be loaded ({type(err).__name__}: {str(err)[:300]}). Pass a "
            "Hub id (e.g. uoft-cs/cifar100; needs network access), a folder of parquet files named by split "
            "(train.parquet, test.parquet) or one parquet file."
        ) from err


def detect_columns(
    features: datasets.Features, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """The image and label columns: as given, or the one present of ``img``/``image`` and
    of ``fine_label``/``label``."""

    def pick(given: str | None, candidates: Sequence[str], kind: str, flag: str) -> str:
        if given is not None:
            if given not in features:
                raise DataError(
                    f"{kind} column {given!r} is not in the data set (columns: {list(features)}); fix `{flag}`."
                )
            return given
        present = [c for c in candidates if c in features]
        if len(present) > 1:
            raise DataError(f"Ambiguous {kind.lower()} column: the data set has {present}; choose one with `{flag}`.")
        if not present:
            raise DataError(
                f"No {kind.lower()} column found (looked for {list(candidates)}, columns: {list(features)}); "
                f"name it with `{flag}`."
            )
        return present[0]

    return (
        pick(image_column, IMAGE_COLUMNS, "Image", "--image_column"),
        pick(label_column, LABEL_COLUMNS, "Label", "--label_column"),
    )


def _class_names(features: datasets.Features, label_column: str, labels: np.ndarray) -> list[str]:
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(int(labels.max()) + 1)] if labels.size else []


# --------------------------------------------------------------------------- selection


def parse_class_selection(spec: str | Sequence[int | str] | None, class_names: Sequence[str]) -> list[int]:
    """Class ids (into ``class_names``) from a selection.

    ``spec`` may be ``None`` (all classes), a preset name from :data:`CLASS_PRESETS`, or
    comma-separated items (or a list of them), each a class id, an inclusive range
    ``a-b``, or a class name. Order is kept: the i-th selected class becomes label i.
    """
    num = len(class_names)
    if spec is None:
        return list(range(num))
    if isinstance(spec, str):
        spec = CLASS_PRESETS.get(spec.strip(), spec)
        items: list[int | str] = [s.strip() for s in spec.split(",")]
    else:
        items = list(spec)
    by_name = {name: i for i, name in enumerate(class_names)}
    ids: list[int] = []
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            ids.append(int(item))
        elif isinstance(item, str) and item in by_name:
            ids.append(by_name[item])
        elif isinstance(item, str) and re.fullmatch(r"\d+\s*-\s*\d+", item):
            lo, hi = (int(x) for x in item.split("-"))
            if lo > hi:
                raise DataError(f"Class range {item!r} is empty: write it low-high, e.g. 50-99.")
            ids.extend(range(lo, hi + 1))
        elif isinstance(item, str) and item:
            close = difflib.get_close_matches(item, list(by_name), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise DataError(
                f"Unknown class {item!r} in the class selection.{hint} Use ids 0..{num - 1}, ranges like 0-4, "
                f"names of the data set's classes, or a preset ({', '.join(CLASS_PRESETS)})."
            )
    if not ids:
        raise DataError("The class selection is empty: name at least two classes (e.g. `--classes 0-4`).")
    bad = [i for i in ids if not 0 <= i < num]
    if bad:
        raise DataError(f"Classes {bad} are out of range: the data set has classes 0..{num - 1}.")
    if len(set(ids)) != len(ids):
        raise DataError(f"The class selection lists a class twice: {ids}.")
    return ids


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator, what: str):
    """Split positions per class: ``round(fraction * n_c)`` (at least 1) go to the second part."""
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        take = max(1, int(round(fraction * idx.size)))
        if take >= idx.size:
            raise DataError(
                f"{what}: class {int(c)} has {idx.size} training images, so a validation fraction of {fraction} "
                "leaves it no training image; lower `--validation_fraction` or set it to 0."
            )
        second.append(idx[:take])
        first.append(idx[take:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


@dataclass
class ClassificationData:
    """A student's (or teacher's) task: splits restricted to the selected classes, with
    labels remapped to ``0..K-1`` in selection order."""

    train: ImageClassificationDataset
    validation: ImageClassificationDataset | None
    test: ImageClassificationDataset | None
    class_names: list[str]
    source_class_ids: list[int]
    dataset_name: str
    image_column: str
    label_column: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_transforms(self, train_transform, eval_transform) -> ClassificationData:
        self.train.transform = train_transform
        for split in (self.validation, self.test):
            if split is not None:
                split.transform = eval_transform
        return self


def load_classification_data(
    dataset: str,
    *,
    dataset_config: str | None = None,
    classes: str | Sequence[int | str] | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    image_column: str | None = None,
    label_column: str | None = None,
    shots_per_class: int | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    raw: datasets.DatasetDict | None = None,
) -> ClassificationData:
    """Load a data set and restrict it to a task.

    The validation split is carved first (stratified, seeded) from the selected classes'
    training images; ``shots_per_class`` images per class are then drawn (stratified,
    seeded) from the rest. The test split is restricted to the same classes.
    """
    if not 0 <= validation_fraction < 1:
        raise DataError(f"`validation_fraction` must be in [0, 1), got {validation_fraction}.")
    raw = raw if raw is not None else load_raw_dataset(dataset, dataset_config)
    if train_split not in raw:
        raise DataError(f"Split {train_split!r} not in {dataset!r} (splits: {list(raw)}); fix `--train_split`.")
    if test_split is not None and test_split not in raw:
        raise DataError(f"Split {test_split!r} not in {dataset!r} (splits: {list(raw)}); fix `--test_split`.")
    train_raw = raw[train_split]
    image_col, label_col = detect_columns(train_raw.features, image_column, label_column)
    train_labels = np.asarray(train_raw.with_format("numpy")[label_col], dtype=np.int64)
    names = _class_names(train_raw.features, label_col, train_labels)
    selected = parse_class_selection(classes, names)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[selected] = np.arange(len(selected))

    positions = np.flatnonzero(remap[train_labels] >= 0)
    counts = np.bincount(remap[train_labels[positions]], minlength=len(selected))
    if (counts == 0).any():
        missing = [names[selected[i]] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"Classes {missing} have no image in split {train_split!r}; remove them from `--classes`.")
    rng = np.random.default_rng(seed)
    local = remap[train_labels[positions]]
    val_positions = None
    if validation_fraction > 0:
        keep, held = _stratified_split(local, validation_fraction, rng, "Validation split")
        positions, val_positions = positions[keep], positions[held]
        local = remap[train_labels[positions]]
    if shots_per_class is not None:
        if shots_per_class < 1:
            raise DataError(f"`shots_per_class` must be >= 1, got {shots_per_class}.")
        available = np.bincount(local, minlength=len(selected))
        short = [(names[selected[c]], int(n)) for c, n in enumerate(available) if n < shots_per_class]
        if short:
            raise DataError(
                f"`shots_per_class={shots_per_class}` is more than some classes have left for training "
                f"(after the validation split): {short[:5]}; lower it."
            )
        chosen = [rng.permutation(np.flatnonzero(local == c))[:shots_per_class] for c in range(len(selected))]
        positions = positions[np.sort(np.concatenate(chosen))]

    def subset(split: datasets.Dataset, pos: np.ndarray, labels: np.ndarray) -> ImageClassificationDataset:
        return ImageClassificationDataset(split.select(pos), image_col, remap[labels[pos]])

    test = None
    if test_split is not None:
        test_raw = raw[test_split]
        test_labels = np.asarray(test_raw.with_format("numpy")[label_col], dtype=np.int64)
        test = subset(test_raw, np.flatnonzero(remap[test_labels] >= 0), test_labels)
    data = ClassificationData(
        train=subset(train_raw, positions, train_labels),
        validation=subset(train_raw, val_positions, train_labels) if val_positions is not None else None,
        test=test,
        class_names=[names[i] for i in selected],
        source_class_ids=selected,
        dataset_name=dataset,
        image_column=image_col,
        label_column=label_col,
    )
    data.info = {
        "train_images": len(data.train),
        "validation_images": len(data.validation) if data.validation is not None else 0,
        "test_images": len(data.test) if data.test is not None else 0,
        "shots_per_class": shots_per_class,
        "validation_fraction": validation_fraction,
        "seed": seed,
    }
    return data


# --------------------------------------------------------------------------- torch side


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values": Tensor, "labels": int}`` from a `datasets.Dataset`.

    Small images are decoded once, on first use, into memory (``uint8`` arrays); larger
    data sets are decoded per item.
    """

    def __init__(self, hf_dataset: datasets.Dataset, image_column: str, labels: np.ndarray, transform=None):
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self._decoded: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _decode_all(self) -> list[np.ndarray] | None:
        first = self._image(0)
        if first.nbytes * len(self) > _PRELOAD_BYTES:
            return None
        column = self.hf_dataset[self.image_column]  # decodes every image once
        return [np.asarray(img.convert("RGB")) for img in column]

    def _image(self, index: int) -> np.ndarray:
        return np.asarray(self.hf_dataset[index][self.image_column].convert("RGB"))

    def preload(self) -> ImageClassificationDataset:
        """Decode every image now (no-op when too large to keep in memory)."""
        if self._decoded is None and len(self):
            self._decoded = self._decode_all()
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._decoded is None:
            self.preload()
        array = self._decoded[index] if self._decoded is not None else self._image(index)
        image = Image.fromarray(array)
        pixels = self.transform(image) if self.transform is not None else T.functional.pil_to_tensor(image)
        return {"pixel_values": pixels, "labels": int(self.labels[index])}


def build_transform(pretrained_cfg: dict[str, Any], train: bool) -> T.Compose:
    """timm's transform for a model's ``pretrained_cfg``; for inputs of 64 px or less,
    training uses the CIFAR recipe (random crop with 1/8 padding, horizontal flip) instead
    of timm's ImageNet random-resized-crop."""
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    size = data_cfg["input_size"][-1]
    if train and size <= 64:
        return T.Compose(
            [
                T.Resize((size, size)),
                T.RandomCrop(size, padding=max(1, size // 8)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(data_cfg["mean"], data_cfg["std"]),
            ]
        )
    if size <= 64:  # small images: resize straight to the input size, no center crop
        return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(data_cfg["mean"], data_cfg["std"])])
    return timm.data.create_transform(**data_cfg, is_training=train)
