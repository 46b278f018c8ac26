"""Image-classification data through `datasets`: loading (Hub id or local files), column
detection, class selection and remapping, few-shot subsampling, a stratified validation
split carved from training data, and timm transforms.

Selections only build index arrays over the Arrow table (``Dataset.select``), so nothing
is rewritten or cached to disk; images are decoded once into memory when they are small
(CIFAR-sized), so decoding never limits training speed.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import timm
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image
from torchvision import transforms as T

from .augmentation_seeds import SeededAugmentation
from .image_decoding import UnreadablePixelsError, add_to_content_digest, array_png, decode_in_order, decode_source
from .messages import error_text, offline_hint

__all__ = [
    "CLASS_PRESETS",
    "ClassificationData",
    "DataError",
    "EmptySplitError",
    "UnknownClassError",
    "ImageClassificationDataset",
    "build_transform",
    "decode_splits",
    "detect_columns",
    "load_classification_data",
    "load_raw_dataset",
    "parse_class_selection",
]

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("fine_label", "label", "labels")  # CIFAR-100, most Hub sets, a few (e.g. beans)

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

#: The splits of a task, in the order ``ClassificationData`` holds them.
SPLITS = ("train", "validation", "test")

#: Inputs up to this size train with the CIFAR recipe (random crop with padding, flip).
CIFAR_STYLE_MAX_SIZE = 64

# Below this many decoded bytes, images are decoded once and kept in memory.
_PRELOAD_BYTES = 2 << 30
# Images decoded before their mean size foretells whether a split fits _PRELOAD_BYTES.
_FORESEE_AFTER = 256


class DataError(ValueError):
    """Data that cannot be used as asked (the message names the problem and the fix)."""


class EmptySplitError(DataError):
    """A split that holds no image of the selected classes."""


class UnknownClassError(DataError):
    """A selected class the data set does not have, or has no training image of."""


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
    """``name``'s messages below ``level`` are dropped inside the block."""
    logger_ = logging.getLogger(name)
    before = logger_.level
    logger_.setLevel(level)
    try:
        yield
    finally:
        logger_.setLevel(before)


#: the file suffixes datasets reads as images in an image folder
_IMAGE_EXTENSIONS = frozenset(e.lower() for e in ImageFolder.EXTENSIONS)
#: datasets' builders for tables of rows, by file suffix (an image column of paths or bytes)
_TABLE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


def load_raw_dataset(name_or_path: str, config_name: str | None = None) -> datasets.DatasetDict:
    """A `DatasetDict` from a Hub id, a local folder (parquet files named by split, the
    Hub layout, or anything `datasets.load_dataset` reads) or a single table (parquet,
    CSV, JSON lines; taken as the ``train`` split). Cached per process (selections never
    modify it) while a local data set's files are unchanged: a notebook that edits them and
    runs again reads them again."""
    return _cached_raw_dataset(name_or_path, config_name, _local_files_state(name_or_path))


def _local_files_state(name_or_path: str) -> tuple[tuple[str, int, int], ...] | None:
    """Each file of a local data set (path, size, modification time), hidden folders aside;
    None for a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        stat = path.stat()
        return ((str(path), stat.st_size, stat.st_mtime_ns),)
    if not path.is_dir():
        return None
    state = []
    for root, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:  # gone meanwhile, or a broken link: the load says what it finds
                continue
            state.append((os.path.join(root, name), stat.st_size, stat.st_mtime_ns))
    return tuple(state)


@functools.lru_cache(maxsize=4)
def _cached_raw_dataset(name_or_path: str, config_name: str | None, files_state) -> datasets.DatasetDict:
    """:func:`load_raw_dataset`'s load, cached by the local files' state too."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix not in _TABLE_BUILDERS:
        raise DataError(
            f"Data set {name_or_path!r} is a file but not a table ({', '.join(_TABLE_BUILDERS)}): pass a parquet or "
            "CSV file, or a folder."
        )
    try:
        if path.is_file():
            return datasets.load_dataset(_TABLE_BUILDERS[path.suffix], data_files={"train": str(path)})
        if path.is_dir():
            with _quiet_logger("huggingface_hub.repocard"):  # a folder's README without a metadata block is fine
                # what datasets.load_dataset does, with a look at the files it reads, by split, in between
                # ("." or "..": named by the folder they are, as datasets names a data set by its folder)
                source = str(path.resolve()) if path.name in ("", ".", "..") else str(path)
                builder = datasets.load_dataset_builder(source, config_name)
                if builder.name == "imagefolder" and config_name is None:
                    builder = _tabular_builder(source, builder) or builder
                files = {str(split): [Path(f) for f in split_files]
                         for split, split_files in (builder.config.data_files or {}).items()}  # fmt: skip
                _check_label_names_agree(path, files)
                _check_class_folders(path, files)
                builder.download_and_prepare()
                return builder.as_dataset()
        if name_or_path.startswith((".", "/")) or name_or_path.endswith(".parquet"):
            raise DataError(f"Data set {name_or_path!r} not found: no such file or folder.")
        return datasets.load_dataset(name_or_path, config_name)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - network, missing repo, unreadable files
        raise DataError(
            f"Data set {name_or_path!r} could not be loaded ({error_text(err, limit=300)}). Pass a "
            "Hub id (e.g. uoft-cs/cifar100; needs network access), a folder of parquet (or CSV) files named by "
            "split (train.parquet, test.parquet), a folder of images by split and class (train/<class>/*.png, "
            f"test/<class>/...) or one parquet or CSV file.{offline_hint(err)}"
        ) from err


load_raw_dataset.cache_clear = _cached_raw_dataset.cache_clear  # (what tests and callers used to reset it)


def _tabular_builder(source: str, image_folder: datasets.DatasetBuilder) -> datasets.DatasetBuilder | None:
    """For a folder that datasets reads as an image folder but that holds tables named by
    split (``train.csv``, ``test.parquet``) beside the images their rows name, the builder of
    those tables: datasets picks a folder's builder by its most common kind of file, so it
    read the images as an image folder (labels from their folders, splits from their names)
    and the tables not at all. None where it holds no such table (an image folder's own
    ``metadata.*`` files are not ones), or where the images lie in class folders (an image
    folder beside a table of the user's own)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    for split_files in (image_folder.config.data_files or {}).values():
        if len({Path(f).parent for f in split_files if Path(f).suffix.lower() in _IMAGE_EXTENSIONS}) > 1:
            return None

    files = DataFilesDict.from_patterns(get_data_patterns(source), base_path=source)
    tables = collections.Counter(
        Path(f).suffix for split_files in files.values() for f in split_files
        if Path(f).suffix in _TABLE_BUILDERS and not Path(f).name.startswith("metadata.")
    )  # fmt: skip
    if not tables:
        return None
    suffix = tables.most_common(1)[0][0]
    by_split = {str(split): [f for f in names if Path(f).suffix == suffix] for split, names in files.items()}
    by_split = {split: kept for split, kept in by_split.items() if kept}
    logger.info(
        "%s holds %s files by split and images: reading the %s files (their rows name the images).", source,
        suffix, suffix,
    )  # fmt: skip
    return datasets.load_dataset_builder(_TABLE_BUILDERS[suffix], data_files=by_split)


def _check_label_names_agree(root: Path, files: dict[str, list[Path]]) -> None:
    """Refuse a folder whose parquet files (``files``: those datasets reads, by split) name
    their label ids differently (``ClassLabel`` names ``[a, b, c]`` in train.parquet, ``[b, c]``
    in test.parquet, as ``class_encode_column`` writes a split that lacks a class):
    ``datasets`` reads every file with one file's names, so the other's label 0 (``b``)
    would silently read as ``a``."""
    import pyarrow.parquet as pq

    seen: dict[str, dict[tuple[str, ...], Path]] = {}  # column -> names -> first file naming them so
    for file in sorted({f for split_files in files.values() for f in split_files if f.suffix == ".parquet"}):
        try:
            metadata = pq.read_schema(file).metadata or {}
        except Exception as err:  # noqa: BLE001 - arrow's errors for a truncated or foreign file
            raise DataError(
                f"{_relative(file, root)} of {root} is not a readable parquet file ({error_text(err)}): it is damaged "
                "or incomplete (a copy cut short?). Copy or write it again."
            ) from None
        try:
            features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
        except (ValueError, AttributeError):  # metadata another writer put there: no ClassLabel names to compare
            continue
        for column, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
                seen.setdefault(column, {}).setdefault(tuple(feature["names"]), file)
    for column, namings in seen.items():
        if len(namings) > 1:
            (first, a), (second, b) = list(namings.items())[:2]
            raise DataError(
                f"The parquet files of {root} name the ids of label column {column!r} differently: "
                f"{_relative(a, root)} as {short_list(list(first))}, {_relative(b, root)} as "
                f"{short_list(list(second))}. datasets reads every file with one file's names, so the same id would "
                "mean another class in another split. Write every split with the same class names (e.g. "
                f"`split.cast_column({column!r}, ClassLabel(names=all_names))` after mapping its labels by name)."
            )


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


#: files that label an image folder's images themselves (then the folders do not)
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def _check_class_folders(root: Path, files: dict[str, list[Path]]) -> None:
    """Refuse an image folder (``files``: the files datasets reads, by split) whose images lie
    in sub-folders of their class folders (``train/cat/day1/0.png``): ``datasets`` labels each
    image by the folder that holds it, so the classes would silently be ``day1``, ``day2``...
    In a split, every class folder lies in one folder (``train/``, ``train/images/``, or the
    data set's own); class folders in several (``train/cat/``, ``train/dog/``) are refused."""
    every = [f for split_files in files.values() for f in split_files]
    if any(f.name in _METADATA_FILES for f in every):
        return  # a metadata file gives the labels
    for split, split_files in files.items():
        images = sorted(f for f in split_files if f.suffix.lower() in _IMAGE_EXTENSIONS)
        holders = {image.parent.parent for image in images}
        if len(holders) < 2:
            continue
        # the image deepest down shows the sub-folder that became its label
        example = min(images, key=lambda image: (-len(image.parts), str(image)))
        names = sorted({image.parent.name for image in images})
        raise DataError(
            f"{root} is read as an image folder, whose images are labelled by the folder that holds them: "
            f"{_relative(example, root)} is labelled {example.parent.name!r}, not {example.parent.parent.name!r}, "
            f"and the classes of split {split!r} would be {short_list(names)}. Put each class's images directly in "
            "its folder (train/<class>/*.jpg, test/<class>/...), or label the images in a metadata.jsonl file "
            "(file_name, label)."
        )


def detect_columns(
    features: datasets.Features, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """The image and label columns: as given, or the one present of ``img``/``image`` and
    of ``fine_label``/``label``/``labels`` (two present: refused as ambiguous)."""

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


def data_fingerprint(parts: dict[str, Any]) -> str:
    """SHA-256 of the arrays and values that describe a task's data (rows, labels, names)."""
    digest = hashlib.sha256()
    for key in sorted(parts):
        value = parts[key]
        digest.update(key.encode())
        if isinstance(value, np.ndarray):
            digest.update(np.ascontiguousarray(value).tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def row_digest(split_name: str, rows: np.ndarray, labels: np.ndarray) -> str:
    """Digest of which rows of split ``split_name`` a task uses and their source labels."""
    return data_fingerprint({"split": split_name, "rows": np.asarray(rows, np.int64),
                             "labels": np.asarray(labels, np.int64)})  # fmt: skip


def short_list(items: Sequence[Any], limit: int = 8) -> str:
    """``items`` for an error message: at most ``limit`` of them, then how many more."""
    items = list(items)
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


def _label_values(split: datasets.Dataset, label_column: str) -> pa.ChunkedArray:
    values = split.with_format("arrow")[:][label_column]
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def _bad_rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return f"1 row (row {rows[0]})" if rows.size == 1 else f"{rows.size} rows (rows {short_list(rows.tolist(), 5)})"


def _label_text(value: float) -> int | float:
    """A label as read (as float64, beside NaN), shown as the integer it is where it is one (-1, not -1.0)."""
    return int(value) if np.isfinite(value) and value == int(value) else value


def _is_list(arrow_type: pa.DataType) -> bool:
    """Whether arrow values of this type are lists (of any of arrow's three list layouts)."""
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def read_labels(
    split: datasets.Dataset, label_column: str, split_name: str, names: list[str] | None = None,
    option: str = "--train_split",
) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Class ids of every row of ``split`` and the class names.

    A ``ClassLabel`` column gives its names; plain parquet (no Hugging Face metadata)
    may hold integer ids (names "0".."max"), whole-number floats, or strings (names in
    sorted order). ``names`` (those of the training split) are kept for other splits.
    Nulls, negative or fractional ids, ids beyond the names and strings that are not
    names are refused with the number of such rows; a split without labels (all -1) is
    refused as unlabelled, naming ``option``, the field that named the split.
    """
    feature = split.features[label_column]
    values = _label_values(split, label_column)
    fix = f"fix or drop them, or choose another column with --label_column (split {split_name!r})"
    if values.null_count:
        mask = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        raise DataError(f"Split {split_name!r} has no label in {label_column!r} in {_bad_rows(mask)}: {fix}.")
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        strings = np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
        names = names if names is not None else sorted(set(strings.tolist()))
        index = {name: i for i, name in enumerate(names)}
        ids = np.array([index.get(v, -1) for v in strings], dtype=np.int64)
        if (ids < 0).any():
            raise DataError(
                f"Split {split_name!r} has labels that are not classes of the training split in {_bad_rows(ids < 0)} "
                f"(e.g. {short_list(sorted(set(strings[ids < 0].tolist())), 3)}): {fix}."
            )
        return ids, names
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        several = _is_list(kind)
        raise DataError(
            f"Label column {label_column!r} holds {kind}, not class ids or names: choose --label_column"
            + (
                " (a list of labels per image is a multi-label task; refilled-hf trains single-label classifiers)."
                if several
                else "."
            )
        )
    raw = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(raw) | (raw != np.round(raw)) | (raw < 0)
    if raw.size and (raw == -1).all():
        instead = {
            "--test_split": ", or pass `--test_split none`",
            "--validation_split": ", or drop --validation_split",
        }
        raise DataError(
            f"Split {split_name!r} is unlabelled: every label in {label_column!r} is -1, the Hub's mark of a missing "
            f"label (as in ImageNet's test split), so nothing can be trained or measured on it. Name a labelled split "
            f"with {option}{instead.get(option, '')}."
        )
    if bad.any():
        raise DataError(
            f"Split {split_name!r} has labels that are not class ids (negative, fractional or NaN) in {_bad_rows(bad)} "
            f"(e.g. {short_list(sorted({_label_text(v) for v in raw[bad].tolist()}), 3)}): {fix}."
        )
    ids = raw.astype(np.int64)
    if names is None:
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        else:
            names = [str(i) for i in range(int(ids.max()) + 1)] if ids.size else []
    beyond = ids >= len(names)
    if beyond.any():
        raise DataError(
            f"Split {split_name!r} has label ids beyond the {len(names)} classes in {_bad_rows(beyond)} "
            f"(e.g. {short_list(sorted(set(ids[beyond].tolist())), 3)}): {fix}."
        )
    return ids, names


# --------------------------------------------------------------------------- selection


def parse_class_selection(spec: str | Sequence[int | str] | None, class_names: Sequence[str]) -> list[int]:
    """Class ids (into ``class_names``) from a selection.

    ``spec`` may be ``None`` (all classes), a preset name from :data:`CLASS_PRESETS`, or
    comma-separated items (or a list of them), each a class id, an inclusive range
    ``a-b``, or a class name. Order is kept: the i-th selected class becomes label i.
    ``id:<id or range>`` and ``name:<name>`` say which an item is: where class names are
    numbers other than their ids (an image folder's ``1``, ``10``, ``2``, sorted as text),
    a bare number that would select another class as an id than as a name is refused.
    """
    num = len(class_names)
    if spec is None:
        return list(range(num))
    preset = spec.strip() if isinstance(spec, str) and spec.strip() in CLASS_PRESETS else None
    if preset is not None and num != 100:
        raise DataError(
            f"--classes {preset} is a preset for CIFAR-100's 100 classes ({CLASS_PRESETS[preset]}), but this data set "
            f"has {num}: name its classes by id, range or name."
        )
    if isinstance(spec, str):
        spec = CLASS_PRESETS.get(spec.strip(), spec)
        items: list[int | str] = [s.strip() for s in spec.split(",")]
    else:
        items = list(spec)
    by_name = {name: i for i, name in enumerate(class_names)}
    ids: list[int] = []
    for item in items:
        if isinstance(item, int):
            ids.append(item)
            continue
        if not isinstance(item, str) or not item:
            continue
        kind, _, rest = item.partition(":")
        numbers = _id_numbers(item)
        if numbers is None and item in by_name:  # a name (one that reads as ids is checked below)
            ids.append(by_name[item])
        elif kind == "name" and rest in by_name:
            ids.append(by_name[rest])
        elif kind == "id" and (given := _id_numbers(rest)) is not None:
            ids.extend(given)
        elif numbers is not None:
            _refuse_ambiguous_ids(item, numbers, class_names, by_name)
            ids.extend(numbers)
        else:
            close = difflib.get_close_matches(rest if kind == "name" else item, list(by_name), n=3)
            hint = f" Did you mean {close}?" if close else ""
            hint += _comma_name_hint(rest if kind == "name" else item, class_names)
            raise UnknownClassError(
                f"Unknown class {item!r} in the class selection.{hint} Use ids 0..{num - 1}, ranges like 0-4, "
                f"names of the data set's classes (id: or name: before an item says which it is), or a preset "
                f"({', '.join(CLASS_PRESETS)})."
            )
    if not ids:
        raise DataError("The class selection is empty: name at least two classes (e.g. `--classes 0-4`).")
    bad = [i for i in ids if not 0 <= i < num]
    if bad:
        raise DataError(f"Classes {short_list(bad)} are out of range: the data set has classes 0..{num - 1}.")
    if len(set(ids)) != len(ids):
        counts = collections.Counter(ids)
        twice = [f"{i} ({class_names[i]})" if str(class_names[i]) != str(i) else str(i)
                 for i in sorted(i for i, n in counts.items() if n > 1)]  # fmt: skip
        shown = ", ".join(twice[:8]) + (f", ... ({len(twice) - 8} more)" if len(twice) > 8 else "")
        raise DataError(
            f"The class selection lists classes twice: {shown} (an id, a range and a name may select the same "
            "class). List each class once."
        )
    return ids


def _comma_name_hint(item: str, class_names: Sequence[str]) -> str:
    """Where ``item`` is a part of class names that hold commas (ImageNet's ``tench, Tinca
    tinca``), which a comma-separated selection splits: say to select them by id."""
    parts = {i: [p.strip() for p in name.split(",")] for i, name in enumerate(class_names) if "," in name}
    matches = [i for i, pieces in parts.items() if item in pieces]
    if not matches:
        return ""
    named = ", ".join(f"{class_names[i]!r} is {i}" for i in matches[:3])
    return (
        f" Class names of this data set hold commas, which split a selection into items: select such classes by "
        f"id ({named})."
    )


def _id_numbers(item: str) -> list[int] | None:
    """The ids an item written as an id (``7``) or a range (``5-9``) selects; None for another item."""
    if item.isdigit():
        return [int(item)]
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
    if match is None:
        return None
    lo, hi = int(match.group(1)), int(match.group(2))
    if lo > hi:
        raise DataError(f"Class range {item!r} is empty: write it low-high, e.g. 50-99.")
    return list(range(lo, hi + 1))


def _refuse_ambiguous_ids(item: str, numbers: list[int], class_names: Sequence[str], by_name: dict[str, int]) -> None:
    """Refuse an item written as ids that also reads as names of other classes: the item
    itself, or a number whose class name is that number but whose id is not. Data sets whose
    class names are their ids (CIFAR's ``0``..``99`` as text) are not refused."""
    readings = dict.fromkeys(([item] if item in by_name else []) + [str(k) for k in numbers])
    conflicts = [n for n in readings if n in by_name and not (n.isdigit() and by_name[n] == int(n))]
    if not conflicts:
        return
    known = [class_names[k] for k in numbers if 0 <= k < len(class_names)]
    as_ids = f"the classes named {short_list(known)}" if known else f"no class (ids run 0..{len(class_names) - 1})"
    raise DataError(
        f"Class selection item {item!r} is ambiguous: as ids it selects {as_ids}, but the data set has classes named "
        f"{short_list(conflicts)} at other ids. Write id:{item} for the ids, or name:<name> for each class by its "
        f"name (name:{conflicts[0]})."
    )


def class_ranges(ids: Sequence[int]) -> str:
    """Class ids as a selection that :func:`parse_class_selection` reads back: ``0-49``,
    ``3,5-7``."""
    parts: list[str] = []
    start = prev = None
    for i in [*ids, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator, names: Sequence[str]):
    """Split positions per class: ``round(fraction * n_c)`` (at least 1) go to the second part
    (the validation split); ``names[c]`` names class ``c`` in the refusal of a class left
    without a training image."""
    first, second, short, most_short = [], [], [], 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        take = max(1, int(round(fraction * idx.size)))
        if take >= idx.size:
            short.append(f"{names[c]} ({idx.size})")
            most_short = max(most_short, idx.size)
            continue
        second.append(idx[:take])
        first.append(idx[take:])
    if short:
        raise DataError(
            f"--validation_fraction {fraction:g} leaves no training image to {len(short)} class"
            f"{'es' if len(short) > 1 else ''} (training images in brackets): {short_list(short, 5)}. Each class "
            "gives at least one image to validation, so it needs at least 2; "
            + ("lower --validation_fraction, " if most_short > 1 else "")
            + "set it to 0 (no validation split), or validate on a split of the data set's own (--validation_split)."
        )
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


@dataclass
class ClassificationData:
    """A student's (or teacher's) task: splits restricted to the selected classes, with
    labels remapped to ``0..K-1`` in selection order."""

    #: None only where the caller asked for other splits (``load_classification_data(splits=...)``)
    train: ImageClassificationDataset | None
    validation: ImageClassificationDataset | None
    test: ImageClassificationDataset | None
    class_names: list[str]
    source_class_ids: list[int]
    dataset_name: str
    image_column: str
    label_column: str
    info: dict[str, Any] = field(default_factory=dict)
    #: identifies the exact images (by their pixels, wherever they lie), labels and classes (see
    #: refilled_hf.rundir): set by :func:`decode_splits`, "" until then
    fingerprint: str = ""
    #: the fingerprint earlier releases recorded (by the data set's path and its files' dates),
    #: by which their runs and results are still matched
    legacy_fingerprint: str = ""
    #: the rows, labels, classes and columns selected (the fingerprint's part known before decoding)
    selection: dict[str, Any] = field(default_factory=dict)
    #: per split decoded, the digest of its images' pixels in order (ImageClassificationDataset.content_digest)
    content_digests: dict[str, str] = field(default_factory=dict)
    #: the data set the task draws from, whatever seed drew it (:func:`source_fingerprint`): set by
    #: :func:`decode_splits`; None where a seed chose some images only, or before decoding
    source_fingerprint: str | None = None
    #: the evaluation transform (also for the training images, e.g. for class centres)
    eval_transform: Any = None
    #: per split ("train", "validation", "test"), a digest of its rows and their labels (None:
    #: no such split); an exported model records them, so that ``evaluate`` can tell whether
    #: a validation split is the one the model was selected on, and a test split the one its
    #: card measured (see :func:`row_digest`)
    row_digests: dict[str, str | None] = field(default_factory=dict)
    #: per split, the rows of the source split it uses (train: of ``train_split``; validation:
    #: of ``validation_source``; test: of ``test_split``; None: no such split), built whichever
    #: splits were asked for
    source_rows: dict[str, np.ndarray | None] = field(default_factory=dict)
    dataset_config: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    #: the data set's own split validated on (``--validation_split``); None: carved from ``train_split``
    validation_split: str | None = None
    #: every class of the data set, in id order (``source_class_ids`` index into it)
    dataset_class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def validation_source(self) -> str:
        """The split of the data set the validation images come from."""
        return self.validation_split or self.train_split

    def validation_description(self) -> str:
        """``'train' (validation part)`` or ``'validation'``: where the validation images are."""
        return _validation_description(self.validation_split, self.train_split)

    def selection_record(self) -> dict[str, Any]:
        """What a model trained on this task records of its data (in its ``config.json``):
        where the images came from, the class selection, how validation and training
        images were drawn, and the digests of those rows."""
        return {
            "dataset": self.dataset_name,
            # a local path (relative ones are read from where the run started) rather than a Hub id
            "dataset_is_local": Path(self.dataset_name).expanduser().exists(),
            "dataset_config": self.dataset_config,
            "image_column": self.image_column,
            "label_column": self.label_column,
            "train_split": self.train_split,
            "test_split": self.test_split,
            **({"validation_split": self.validation_split} if self.validation_split else {}),
            "class_names": list(self.class_names),
            "source_class_ids": [int(i) for i in self.source_class_ids],
            **{key: self.info.get(key) for key in ("validation_fraction", "shots_per_class", "seed")},
            **{f"{key}_images": self.info.get(f"{key}_images") for key in ("train", "validation")},
            "row_digests": dict(self.row_digests),
            # the training images' pixels, in order: a copy of the data set elsewhere is told from another
            # data set whose rows and labels happen to be laid out alike (see evaluation.check_evaluation_split)
            **({"train_content_digest": self.content_digests["train"]} if "train" in self.content_digests else {}),
            # (the test images' pixels: evaluate tells whether a test split is the one the model's card measured)
            **({"test_content_digest": self.content_digests["test"]} if "test" in self.content_digests else {}),
        }  # fmt: skip

    def with_transforms(self, train_transform, eval_transform) -> ClassificationData:
        self.eval_transform = eval_transform
        if self.train is not None:
            self.train.transform = train_transform
        for split in (self.validation, self.test):
            if split is not None:
                split.transform = eval_transform
        return self


def _classes_without_images(local: np.ndarray, selected: Sequence[int], names: Sequence[str]) -> list[str]:
    """The names of the selected classes that ``local`` (a split's labels of the selection,
    remapped to ``0..K-1``) holds no image of."""
    counts = np.bincount(local, minlength=len(selected))
    return [names[selected[i]] for i in np.flatnonzero(counts == 0)]


def _validation_description(validation_split: str | None, train_split: str) -> str:
    return validation_split or f"{train_split} (validation part)"


def _check_split_classes(local: np.ndarray, selected: Sequence[int], names: Sequence[str], split: str,
                        option: str = "--test_split") -> list[str]:  # fmt: skip
    """A test (or validation) split without any image of the selection has nothing to
    measure (its top-1 would read 0 %): refused. One that lacks some classes measures the
    others only: said, and those classes returned. ``option`` is the field that named the split."""
    missing = _classes_without_images(local, selected, names)
    if len(missing) == len(selected):
        drop = "pass `--test_split none`" if option == "--test_split" else f"drop {option}"
        raise EmptySplitError(
            f"Split {split!r} has no image of the selected classes {short_list(missing)}: there is nothing to measure "
            f"on it. Name a split that holds them ({option}), or {drop}."
        )
    if missing:
        logger.warning(
            "Split %r has no image of %d of the %d selected classes (%s): its accuracy measures the other classes "
            "only.", split, len(missing), len(selected), short_list(missing),
        )  # fmt: skip
    return missing


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
    validation_split: str | None = None,
    seed: int = 0,
    raw: datasets.DatasetDict | None = None,
    splits: Sequence[str] = SPLITS,
    decode: bool = True,
) -> ClassificationData:
    """Load a data set and restrict it to a task.

    The validation split is carved first (stratified, seeded) from the selected classes'
    training images; ``shots_per_class`` images per class are then drawn (stratified,
    seeded) from the rest. The test split is restricted to the same classes. With
    ``validation_split`` (then ``validation_fraction`` must be 0) the validation images are
    that split's images of the selected classes, and nothing is carved.
    Only the ``splits`` named are built and decoded (the others are None); the
    selection and its counts are the same either way (the fingerprint, set once the images
    are decoded, covers the pixels of the splits built). ``decode=False``
    leaves the decoding to the caller (each split's :meth:`~ImageClassificationDataset.preload`):
    the labels and class names are there at once, for checks that need nothing else.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits must be among {SPLITS}, got {sorted(unknown)}.")
    if not 0 <= validation_fraction < 1:
        raise DataError(f"`validation_fraction` must be in [0, 1), got {validation_fraction}.")
    raw = raw if raw is not None else load_raw_dataset(dataset, dataset_config)
    # Only the test split asked for (evaluate): a data set without the training split, or whose one
    # split is named as the training one (a folder of class folders is `train` to datasets), is
    # evaluated on its own, the test split naming the classes; whether the model trained on those
    # images is the caller's check (it knows the model's record), and no training rows are selected.
    test_only = tuple(splits) == ("test",) and test_split is not None and test_split in raw
    if test_only and (train_split not in raw or train_split == test_split):
        train_split = test_split
    else:
        test_only = False
    if train_split not in raw:
        raise DataError(f"Split {train_split!r} not in {dataset!r} (splits: {list(raw)}); fix `--train_split`.")
    if test_split == train_split and not test_only:
        raise DataError(
            f"--test_split {test_split!r} is the training split: the test accuracy would be measured on training "
            "images. Name another split, or pass `--test_split none`."
        )
    if test_split is not None and test_split not in raw:
        others = [name for name in raw if name not in (train_split, validation_split)]
        raise DataError(
            f"Split {test_split!r} not in {dataset!r} (splits: {list(raw)}); fix `--test_split`"
            + (f" (e.g. `--test_split {others[0]}`)" if others else "")
            + ", or pass `--test_split none` to run without a test split."
        )
    unused = [name for name in ("validation", "valid", "val") if name in raw and name not in (train_split, test_split)]
    if validation_split is None and validation_fraction > 0 and unused and "validation" in splits:
        logger.info(
            "The data set has a %r split, which this run does not use: its validation split is carved from %r "
            "(--validation_fraction %g). Pass --validation_split %s to validate on it instead.",
            unused[0], train_split, validation_fraction, unused[0],
        )  # fmt: skip
    if validation_split is not None:
        if validation_fraction > 0:
            raise DataError("`validation_split` and `validation_fraction > 0` both ask for a validation split.")
        if validation_split in (train_split, test_split):
            raise DataError(
                f"--validation_split {validation_split!r} is the training or test split: name another split."
            )
        if validation_split not in raw:
            raise DataError(
                f"Split {validation_split!r} not in {dataset!r} (splits: {list(raw)}); fix `--validation_split`, or "
                "drop it to carve the validation split from the training split (--validation_fraction)."
            )
    train_raw = raw[train_split]
    image_col, label_col = detect_columns(train_raw.features, image_column, label_column)
    train_labels, names = read_labels(train_raw, label_col, train_split)
    if classes is None and not isinstance(train_raw.features[label_col], datasets.ClassLabel):
        classes = [int(c) for c in np.unique(train_labels)]  # plain labels: the classes present
    if test_only and classes is not None and not isinstance(classes, str):
        # a held-out set's classes are those it holds: one of the model's (named) that it lacks has no
        # image here, and is measured as such (the split's check below warns), not refused as unknown
        wanted = [c[len("name:") :] for c in classes if isinstance(c, str) and c.startswith("name:")]
        names = [*names, *(name for name in wanted if name not in names)]
    selected = parse_class_selection(classes, names)
    if len(selected) < 2 and not test_only:
        raise DataError(
            f"The class selection has one class ({names[selected[0]]}): a classifier trained on it, or a probe of "
            "it, tells nothing apart, and its accuracy would be 100 % whatever it learned. Select at least two "
            "classes (`--classes`)."
        )
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[selected] = np.arange(len(selected))

    positions = np.flatnonzero(remap[train_labels] >= 0)
    if test_only:  # no training rows; the test split's own check below says which classes it lacks
        positions = positions[:0]
        validation_fraction, shots_per_class = 0.0, None
    missing = [] if test_only else _classes_without_images(remap[train_labels[positions]], selected, names)
    if missing:
        if classes is not None:
            fix = "remove them from `--classes`"
        else:  # every class the data set names, of which some only in other splits
            present = [c for c in selected if names[c] not in missing]
            fix = f"select the others: `--classes {class_ranges(present)}`" if present else "check --train_split"
        raise UnknownClassError(f"Classes {short_list(missing)} have no image in split {train_split!r}; {fix}.")
    rng = np.random.default_rng(seed)
    local = remap[train_labels[positions]]
    val_positions = None
    if validation_fraction > 0:
        keep, held = _stratified_split(local, validation_fraction, rng, [names[i] for i in selected])
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
                f"(after the validation split): {short_list(short, 5)}; lower it."
            )
        chosen = [rng.permutation(np.flatnonzero(local == c))[:shots_per_class] for c in range(len(selected))]
        positions = positions[np.sort(np.concatenate(chosen))]

    local = Path(dataset).expanduser()
    image_root = local if local.is_dir() else local.parent if local.is_file() else None

    def subset(split: datasets.Dataset, pos: np.ndarray, labels: np.ndarray, name: str) -> ImageClassificationDataset:
        return ImageClassificationDataset(split.select(pos), image_col, remap[labels[pos]], split_name=name,
                                          source_rows=pos, image_root=image_root)  # fmt: skip

    def other_split(name: str, option: str) -> tuple[datasets.Dataset, np.ndarray, np.ndarray]:
        """A split other than the training one (named by ``option``): its rows, labels and
        positions of the selection."""
        split_raw = raw[name]
        if image_col not in split_raw.features or label_col not in split_raw.features:
            raise DataError(f"Split {name!r} lacks the columns {image_col!r}/{label_col!r} of {train_split!r}.")
        labels, _ = read_labels(split_raw, label_col, name, names, option)
        return split_raw, labels, np.flatnonzero(remap[labels] >= 0)

    test = test_positions = None
    validation = None
    unmeasured: dict[str, list[str]] = {}  # per split other than train, the selected classes it has no image of
    val_raw, val_labels = train_raw, train_labels
    if validation_split is not None:
        val_raw, val_labels, val_positions = other_split(validation_split, "--validation_split")
        unmeasured["validation"] = _check_split_classes(
            remap[val_labels[val_positions]], selected, names, validation_split, "--validation_split"
        )
    if val_positions is not None and "validation" in splits:
        where = _validation_description(validation_split, train_split)
        validation = subset(val_raw, val_positions, val_labels, where)
    if test_split is not None:
        test_raw, test_labels, test_positions = other_split(test_split, "--test_split")
        if "test" in splits:
            unmeasured["test"] = _check_split_classes(remap[test_labels[test_positions]], selected, names, test_split)
            test = subset(test_raw, test_positions, test_labels, test_split)
    data = ClassificationData(
        train=subset(train_raw, positions, train_labels, train_split) if "train" in splits else None,
        validation=validation,
        test=test,
        class_names=[names[i] for i in selected],
        source_class_ids=selected,
        dataset_name=dataset,
        image_column=image_col,
        label_column=label_col,
        dataset_config=dataset_config,
        train_split=train_split,
        test_split=test_split,
        validation_split=validation_split,
        dataset_class_names=list(names),
    )
    data.info = {
        "train_images": len(positions),
        "validation_images": len(val_positions) if val_positions is not None else 0,
        "test_images": len(test_positions) if test_positions is not None else 0,
        "shots_per_class": shots_per_class,
        "validation_fraction": validation_fraction,
        **({"validation_split": validation_split} if validation_split else {}),
        "seed": seed,
        # only where a split lacks classes (its accuracy measures the others), as the model card says
        **{f"{split}_classes_without_images": missing for split, missing in unmeasured.items() if missing},
    }
    selection = {
        "splits": [train_split, test_split],
        "columns": [image_col, label_col],
        "class_names": data.class_names,
        "train_rows": positions,
        "validation_rows": val_positions if val_positions is not None else np.zeros(0, np.int64),
        "test_rows": test_positions if test_positions is not None else np.zeros(0, np.int64),
        "train_labels": train_labels,
        # only where set, so that every carved selection keeps the fingerprint it had before the option
        **({"validation_split": validation_split, "validation_labels": val_labels[val_positions]}
           if validation_split else {}),
    }  # fmt: skip
    data.selection = selection
    # What earlier releases recorded: the selection, the data set's name or path, and datasets'
    # fingerprints of its files, which follow their modification dates (a copy made again differs).
    legacy = {
        **selection,
        "dataset": dataset,
        "config": dataset_config,
        "source": [getattr(raw[s], "_fingerprint", None) for s in (train_split, test_split) if s is not None],
    }
    if validation_split:
        legacy["validation_split"] = [validation_split, getattr(val_raw, "_fingerprint", None)]
    data.legacy_fingerprint = data_fingerprint(legacy)  # fmt: skip
    data.source_rows = {"train": positions, "validation": val_positions, "test": test_positions}
    data.row_digests = {
        "train": row_digest(train_split, positions, train_labels[positions]),
        "validation": (
            row_digest(data.validation_source, val_positions, val_labels[val_positions])
            if val_positions is not None
            else None
        ),
        "test": (
            row_digest(test_split, test_positions, test_labels[test_positions]) if test_positions is not None else None
        ),
    }
    if decode:
        decode_splits(data)
    return data


def decode_splits(data: ClassificationData, log: bool = True) -> ClassificationData:
    """Decode-check every image of ``data``'s splits now (refused with the bad rows named),
    keeping them decoded when they fit in memory; count the validation and test images whose
    pixels are a training image's (:func:`images_in_training`; said in the log where ``log``:
    one process of several says it)."""
    for split in (data.train, data.validation, data.test):
        if split is not None:
            split.preload()
    pixels = {name: split.content_digest for name, split in zip(SPLITS, (data.train, data.validation, data.test))
              if split is not None}  # fmt: skip
    data.content_digests = pixels
    data.fingerprint = data_fingerprint({**data.selection, "pixels": pixels})
    data.source_fingerprint = source_fingerprint(data)
    images_in_training(data, log=log)
    return data


def source_fingerprint(data: ClassificationData) -> str | None:
    """SHA-256 of the images ``data``'s task draws from, the same whatever seed drew them: every
    image of the selected classes in each split read (its pixel digest and class, in the
    files' order), whichever of them the validation carve took. Two runs with equal ones
    read the same data set, wherever its files lay (``compare`` takes them for one setting).
    None where a seed chose some of those images only (``shots_per_class``), or a split is
    not decoded yet."""
    splits = ((data.train_split, data.train), (data.validation_source, data.validation), (data.test_split, data.test))
    if data.info.get("shots_per_class") is not None or any(
        s is not None and s.pixel_digests is None for _, s in splits
    ):
        return None
    drawn: dict[str, list[ImageClassificationDataset]] = {}
    for source, split in splits:
        if split is not None:
            drawn.setdefault(source, []).append(split)
    digest = hashlib.sha256(json.dumps(data.class_names).encode())
    for source in sorted(drawn):
        rows = np.concatenate([np.asarray(s.source_rows, np.int64) for s in drawn[source]])
        labels = np.concatenate([np.asarray(s.labels, np.int64) for s in drawn[source]])
        pixels = np.concatenate([s.pixel_digests.view(np.int64) for s in drawn[source]])
        order = np.argsort(rows, kind="stable")
        digest.update(f"|{source}|".encode())
        digest.update(np.ascontiguousarray(np.stack([labels[order], pixels[order]], axis=1)).tobytes())
    return digest.hexdigest()


#: the share of test images identical to training images above which a run warns (below: logged)
LEAK_WARNING_SHARE = 0.01


def images_in_training(data: ClassificationData, log: bool = True) -> None:
    """Count the validation and test images that have exactly the pixels of an image the
    model trains on (the same photo in both splits: its top-1 measures memory, not
    generalization), by split; recorded in ``data.info`` (``test_images_in_training``,
    ``validation_images_in_training``) where there are any, and logged: a warning from
    :data:`LEAK_WARNING_SHARE` of the split on (CIFAR-100 itself has 10 of 10,000 test
    images, which is logged only)."""
    train = data.train
    if train is None or train.pixel_digests is None:
        return
    for kind, split in (("validation", data.validation), ("test", data.test)):
        if split is None or split.pixel_digests is None or not len(split):
            continue
        same = np.isin(split.pixel_digests, train.pixel_digests)
        count = int(same.sum())
        if not count:
            continue
        data.info[f"{kind}_images_in_training"] = count
        if not log:
            continue
        share = count / len(split)
        rows = short_list([int(r) for r in split.source_rows[same]], 5)
        (logger.warning if share >= LEAK_WARNING_SHARE else logger.info)(
            "%d of the %d %s images (%.1f%%; split %r, rows %s) have exactly the pixels of a training image of "
            "this run: their top-1 measures what the model memorized, not how it generalizes.", count, len(split),
            kind, 100 * share, split.split_name, rows,
        )  # fmt: skip


# --------------------------------------------------------------------------- torch side


def _list_row_array(value: pa.ListScalar) -> np.ndarray:
    """One row of nested lists as a numpy array of its leaf type (about 35 us for a CIFAR image;
    ``datasets``' numpy formatting took about 1000x longer here); an object array where the lists
    of one level have unequal lengths (not an image)."""
    values, shape = value.values, [len(value.values)]
    while _is_list(values.type):
        lengths = pa.compute.list_value_length(values).to_numpy(zero_copy_only=False)
        if not lengths.size or not (lengths == lengths[0]).all():
            return np.array(None, dtype=object)
        shape.append(int(lengths[0]))
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(shape)


def _integer_array_leaf(arrow_type: pa.DataType) -> bool:
    """Whether a column of this arrow type holds arrays of integers (lists of lists ... of them;
    also as ``datasets``' ``Array2D`` and ``Array3D`` features store them)."""
    if isinstance(arrow_type, pa.ExtensionType):
        arrow_type = arrow_type.storage_type
    depth = 0
    while _is_list(arrow_type):
        arrow_type, depth = arrow_type.value_type, depth + 1
    return depth > 0 and pa.types.is_integer(arrow_type)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values": Tensor, "labels": int}`` from a `datasets.Dataset`.

    :meth:`preload` decodes every image once, refusing the data set if any cannot be
    decoded (missing, truncated, corrupt), and keeps the decoded ``uint8`` arrays in
    memory when they fit :data:`_PRELOAD_BYTES`; larger data sets are decoded per item.
    The image column may be an ``Image`` feature or, in plain parquet, encoded bytes.
    """

    def __init__(self, hf_dataset: datasets.Dataset, image_column: str, labels: np.ndarray, transform=None, *,
                 split_name: str = "train", source_rows: np.ndarray | None = None,
                 image_root: str | Path | None = None):  # fmt: skip
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        #: the folder relative image paths are read from (the data set's own, for a local one)
        self.image_root = None if image_root is None else Path(image_root)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.split_name = split_name
        self.source_rows = np.arange(len(self.labels)) if source_rows is None else np.asarray(source_rows)
        self._decoded: list[np.ndarray] | None = None
        self._checked = False
        self._encoded: datasets.Dataset | None = None
        #: (smallest, largest) image side in pixels, known once :meth:`preload` has run
        self.side_range: tuple[int, int] | None = None
        #: a 64-bit digest of each image's decoded pixels (and size), known once :meth:`preload` has run
        #: (:func:`pixel_digest`: the same in every process)
        self.pixel_digests: np.ndarray | None = None
        #: SHA-256 of every image's size and pixels, in order: the same wherever and however the
        #: images are stored (known once :meth:`preload` has run)
        self.content_digest: str | None = None
        #: ``transform`` with its draws seeded per image (:meth:`seed_augmentation`), or None
        self.augmentation: SeededAugmentation | None = None

    def seed_augmentation(self, seed: int, stream: str) -> SeededAugmentation:
        """Seed the training transform's draws per image from ``seed``, ``stream`` (the stage)
        and the epoch (the returned object's ``set_epoch``): see :mod:`refilled_hf.augmentation_seeds`."""
        self.augmentation = SeededAugmentation(self.transform, seed, stream)
        return self.augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def _encoded_images(self) -> datasets.Dataset:
        if self._encoded is None:
            split = self.hf_dataset
            if getattr(split.features.get(self.image_column), "dtype", None) == "large_string":
                # paths in a CSV as datasets 3.x reads it: arrow casts only `string` to an image
                split = split.cast_column(self.image_column, datasets.Value("string"))
            if _integer_array_leaf(split.data.schema.field(self.image_column).type):
                self._encoded = self._arrays_as_png(split)
                return self._encoded
            try:
                self._encoded = split.cast_column(self.image_column, datasets.Image(decode=False))
            except Exception as err:  # noqa: BLE001 - a column that holds no images
                feature = repr(self.hf_dataset.features.get(self.image_column))
                floats = "float" in feature
                raise DataError(
                    f"Column {self.image_column!r} of split {self.split_name!r} does not hold images "
                    f"({type(err).__name__}; it holds {feature if len(feature) <= 80 else feature[:77] + '...'}): "
                    + (
                        "arrays of floats, whose range nothing states: store them as uint8 (0..255) arrays or image "
                        "files."
                        if floats
                        else "choose the image column with --image_column."
                    )
                ) from None
        return self._encoded

    def _arrays_as_png(self, split: datasets.Dataset) -> datasets.Dataset:
        """The image column of ``split``, whose rows are arrays of integer pixels (nested lists,
        as ``Dataset.from_dict`` stores a numpy batch), as an ``Image`` column of PNG bytes holding
        the same pixels (:func:`array_png`); a row that is no such image is refused, named."""
        encoded: list[dict[str, Any]] = []
        for batch in split.select_columns([self.image_column]).with_format("arrow").iter(batch_size=1024):
            for chunk in batch.column(self.image_column).chunks:
                if isinstance(chunk, pa.ExtensionArray):  # datasets' Array2D / Array3D features
                    chunk = chunk.storage
                for index in range(len(chunk)):
                    value = chunk[index]
                    try:
                        png = array_png(_list_row_array(value)) if value.is_valid else None
                    except UnreadablePixelsError as err:
                        row = int(self.source_rows[len(encoded)])
                        raise DataError(
                            f"Split {self.split_name!r}, row {row}: column {self.image_column!r} holds {err}"
                        ) from None
                    encoded.append({"bytes": png, "path": None})
        features = datasets.Features({self.image_column: datasets.Image(decode=False)})
        return datasets.Dataset.from_dict({self.image_column: encoded}, features=features)

    def _source(self, item: dict[str, Any] | None) -> tuple[bytes | str | None, str | None]:
        """Where an image column's item holds its image: ``(its bytes, None)``, or ``(the path
        it is read from, the path as the data set names it)``; ``(None, None)`` for none."""
        if not item:
            return None, None
        if item.get("bytes"):
            return item["bytes"], None
        path = item.get("path")
        return (self._image_path(path), path) if path else (None, None)

    def _decode(self, item: dict[str, Any] | None) -> np.ndarray:
        return decode_source(self._source(item)[0])

    def _image_path(self, path: str) -> str:
        """A relative image path from the data set's folder (where its parquet or CSV files
        lie, as a Hub data set's paths are from its repo), not from wherever the run was started;
        one that lies there only relative to the working folder is read there."""
        if self.image_root is None or os.path.isabs(path) or "://" in path:
            return path
        beside = self.image_root / path
        return str(beside) if beside.exists() or not os.path.exists(path) else path

    def _image(self, index: int) -> np.ndarray:
        return self._decode(self._encoded_images()[int(index)][self.image_column])

    def _array(self, index: int) -> np.ndarray:
        """Image ``index``, decoded: kept by :meth:`preload`, or decoded now."""
        return self._decoded[index] if self._decoded is not None else self._image(index)

    def preload(self) -> ImageClassificationDataset:
        """Decode-check every image now; keep them decoded when they fit in memory."""
        if self._checked or not len(self):
            self.content_digest = self.content_digest or hashlib.sha256().hexdigest()
            if self.pixel_digests is None:
                self.pixel_digests = np.zeros(0, dtype=np.uint64)
            return self
        column = self._encoded_images()[self.image_column]
        decoded: list[np.ndarray] | None = []
        digests = np.zeros(len(self), dtype=np.uint64)
        bad: list[tuple[int, str]] = []
        content = hashlib.sha256()  # (0.1 s for CIFAR-100's 50,000 images: a fiftieth of decoding them)
        total, smallest, largest = 0, 1 << 30, 0
        sources = (self._source(item) for item in column)
        what = f"images of split {self.split_name!r}"
        with contextlib.closing(decode_in_order(sources, len(self), what=what)) as images:
            for i, image in enumerate(images):
                if image.problem == "unreadable":
                    raise DataError(f"Split {self.split_name!r}, row {int(self.source_rows[i])}: {image.text}")
                if image.problem:
                    bad.append((i, image.text))
                    continue
                array = image.array
                smallest, largest = min(smallest, *array.shape[:2]), max(largest, *array.shape[:2])
                digests[i] = image.digest
                add_to_content_digest(content, array)
                if decoded is not None:
                    total += array.nbytes
                    decoded.append(array)
                    # too large to keep (decoded per item then): known at the end, or foreseen from the first
                    # images, which spares keeping (and page-faulting) gigabytes to drop them (0.4 ms per photo here)
                    seen = len(decoded)
                    if total > _PRELOAD_BYTES or (seen >= _FORESEE_AFTER and total / seen * len(self) > _PRELOAD_BYTES):
                        decoded = None
        if bad:
            rows = short_list([f"row {int(self.source_rows[i])} ({kind})" for i, kind in bad], 5)
            # files (a folder data set, paths in a table) rather than bytes in a table
            files = any(self._source(self._encoded_images()[i][self.image_column])[1] for i, _ in bad)
            raise DataError(
                f"{len(bad)} image{'s' if len(bad) > 1 else ''} of split {self.split_name!r} cannot be decoded "
                f"(missing, truncated or corrupt): "
                f"{rows}. Fix or {'remove those files' if files else 'drop those rows'}."
                + (
                    f" (Relative image paths are read from {self.image_root}, the data set's folder.)"
                    if self.image_root is not None and any(kind.startswith("no file") for _, kind in bad)
                    else ""
                )
            )
        self._decoded = decoded
        self._checked = True
        self.side_range = (smallest, largest)
        self.pixel_digests = digests
        self.content_digest = content.hexdigest()
        return self

    def rows_content_digest(self, rows: np.ndarray) -> str:
        """The content digest (as :attr:`content_digest` is of the whole split) of the images
        at ``rows`` of the source split, in that order; every row must be one of this split's."""
        content = hashlib.sha256()
        for index in np.searchsorted(self.source_rows, rows):
            add_to_content_digest(content, self._array(index))
        return content.hexdigest()

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = Image.fromarray(self._array(index))
        if self.transform is None:
            pixels = T.functional.pil_to_tensor(image)
        elif self.augmentation is not None and self.augmentation.transform is self.transform:  # (not a copy's other)
            pixels = self.augmentation(image, index)
        else:
            pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": int(self.labels[index])}


def build_transform(pretrained_cfg: dict[str, Any], train: bool) -> T.Compose:
    """timm's transform for a model's ``pretrained_cfg``; for inputs of 64 px or less,
    training uses the CIFAR recipe (random crop with 1/8 padding, horizontal flip) instead
    of timm's ImageNet random-resized-crop."""
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    size = data_cfg["input_size"][-1]
    if train and size <= CIFAR_STYLE_MAX_SIZE:
        return T.Compose(
            [
                T.Resize((size, size)),
                T.RandomCrop(size, padding=max(1, size // 8)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(data_cfg["mean"], data_cfg["std"]),
            ]
        )
    if size <= CIFAR_STYLE_MAX_SIZE:  # small images: resize straight to the input size, no center crop
        return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(data_cfg["mean"], data_cfg["std"])])
    return timm.data.create_transform(**data_cfg, is_training=train)
