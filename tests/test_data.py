"""Data loading, column detection, class selection, shots and validation splits."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from helpers import CLASS_NAMES, write_image_dataset

from refilled_hf.data import (
    CLASS_PRESETS,
    DataError,
    build_transform,
    class_ranges,
    load_classification_data,
    load_raw_dataset,
    parse_class_selection,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("d") / "colors", per_class_train=20, per_class_test=5)


def test_parse_class_selection():
    names = [f"c{i}" for i in range(100)]
    assert parse_class_selection(None, names[:3]) == [0, 1, 2]
    assert parse_class_selection("50-52", names) == [50, 51, 52]
    assert parse_class_selection("3,1, 7-8", names) == [3, 1, 7, 8]
    assert parse_class_selection("c5,c2", names) == [5, 2]
    assert parse_class_selection([4, "c9"], names) == [4, 9]
    assert parse_class_selection("cifar100-second-half", names) == list(range(50, 100))
    assert parse_class_selection("cifar100-shift-10", names) == list(range(10, 60))
    assert set(CLASS_PRESETS) >= {f"cifar100-shift-{k}" for k in (10, 20, 30, 40)}
    with pytest.raises(DataError, match=r"twice: 0 \(c0\), 2 \(c2\) \(an id, a range and a name"):
        parse_class_selection("0-4,c0,2", names)
    with pytest.raises(DataError, match=r"twice: 1 \(an id"):
        parse_class_selection("0-2,1", [str(i) for i in range(5)])  # names that are their ids: said once


def test_class_names_that_are_numbers_other_than_their_ids_are_never_read_as_the_wrong_class():
    """An image folder's classes 10, 2, 3 (sorted as text) have ids 0, 1, 2: a bare 2 is the
    class named 2 (id 1) or id 2 (the class named 3). An item whose two readings differ is
    refused; id: and name: say which is meant."""
    names = ["10", "2", "3"]  # class "2" has id 1, id 2 is class "3"
    for spec in ("2", "3,2", "10", "1-2", ["2"]):
        with pytest.raises(DataError, match=r"ambiguous: as ids it selects .* Write id:"):
            parse_class_selection(spec, names)
    assert parse_class_selection("name:2,name:10", names) == [1, 0]
    assert parse_class_selection("id:2,id:0-1", names) == [2, 0, 1]
    assert parse_class_selection(["name:3", 1], names) == [2, 1]  # an int in a list is an id
    assert parse_class_selection("0-1", names) == [0, 1]  # no class is named 0 or 1: only ids
    # a name that reads as a range is refused bare, taken with name:
    assert parse_class_selection("name:1-3", ["1-3", "a", "b", "c"]) == [0]
    with pytest.raises(DataError, match="ambiguous"):
        parse_class_selection("1-3", ["1-3", "a", "b", "c"])
    # names that are their ids (CIFAR's labels written as text) read either way, as before
    digits = [str(i) for i in range(100)]
    assert (
        parse_class_selection("3,50-52", digits) == [3, 50, 51, 52] == parse_class_selection("name:3,id:50-52", digits)
    )
    with pytest.raises(DataError, match=r"Unknown class 'name:x'.*id: or name:"):
        parse_class_selection("name:x", names)


def test_class_ranges_read_back_as_the_same_selection():
    names = [f"c{i}" for i in range(100)]
    assert class_ranges(list(range(50))) == "0-49" and class_ranges([3, 5, 6, 7, 9]) == "3,5-7,9"
    assert class_ranges([9, 8, 7]) == "9,8,7"  # order is the label order: never sorted into a range
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = [int(i) for i in rng.permutation(100)[: rng.integers(1, 100)]]
        if rng.random() < 0.5:
            ids.sort()
        assert parse_class_selection(class_ranges(ids), names) == ids


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "empty"),
        ("5-2", "empty"),
        ("0-100", r"out of range.*0\.\.99"),
        ("c1,cat", "Unknown class 'cat'"),
        ("c1,c1", "twice"),
        ("c11x", "Did you mean"),
    ],
)
def test_parse_class_selection_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_class_selection(spec, [f"c{i}" for i in range(100)])


def test_a_cifar100_preset_on_another_data_set_says_what_it_is():
    with pytest.raises(DataError, match=r"--classes cifar100-second-half is a preset for CIFAR-100's 100 classes"):
        parse_class_selection("cifar100-second-half", [f"c{i}" for i in range(10)])
    assert parse_class_selection("cifar100-shift-10", [f"c{i}" for i in range(100)]) == list(range(10, 60))


def test_a_part_of_a_class_name_that_holds_commas_is_answered_with_its_id():
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    assert parse_class_selection("great white shark,0", names) == [2, 0]
    with pytest.raises(DataError, match=r"Unknown class 'tench'.* hold commas, .* by id \('tench, Tinca tinca' is 0\)"):
        parse_class_selection("tench, Tinca tinca,great white shark", names)
    with pytest.raises(DataError, match=r"by id \('goldfish, Carassius auratus' is 1\)"):
        parse_class_selection("name:goldfish", names)
    with pytest.raises(DataError, match="Unknown class 'shark'") as err:
        parse_class_selection("shark", names)
    assert "commas" not in str(err.value)


def test_selection_remaps_labels_and_keeps_names(data_dir):
    data = load_classification_data(str(data_dir), classes="blue,red", validation_fraction=0.0)
    assert data.class_names == ["blue", "red"] and data.source_class_ids == [2, 0]
    assert sorted(set(data.train.labels.tolist())) == [0, 1]
    item = data.train[0]
    assert set(item) == {"pixel_values", "labels"}
    # The remapped label of every training image agrees with its colour.
    colours = {0: 2, 1: 0}  # new label -> dominant channel (blue, red)
    for i in range(len(data.train)):
        pixels = data.train[i]["pixel_values"].float().mean((1, 2))
        assert int(pixels.argmax()) == colours[int(data.train.labels[i])]
    assert len(data.test) == 10 and len(data.train) == 40


def test_shots_and_validation_are_stratified_and_seeded(data_dir):
    kwargs = dict(classes="0-3", shots_per_class=5, validation_fraction=0.25)
    a = load_classification_data(str(data_dir), seed=1, **kwargs)
    b = load_classification_data(str(data_dir), seed=1, **kwargs)
    c = load_classification_data(str(data_dir), seed=2, **kwargs)
    assert np.bincount(a.train.labels).tolist() == [5, 5, 5, 5]
    assert np.bincount(a.validation.labels).tolist() == [5, 5, 5, 5]
    rows = lambda d: [d.hf_dataset[i]["image"].tobytes() for i in range(len(d))]  # noqa: E731
    assert rows(a.train) == rows(b.train) and rows(a.train) != rows(c.train)
    assert not set(rows(a.train)) & set(rows(a.validation)), "validation must not overlap training"
    assert a.info == {"train_images": 20, "validation_images": 20, "test_images": 20, "shots_per_class": 5,
                      "validation_fraction": 0.25, "seed": 1}  # fmt: skip
    # the row digests tell the seeds' validation splits apart, and not the shots drawn after them
    assert a.row_digests == b.row_digests and a.row_digests["validation"] != c.row_digests["validation"]
    d = load_classification_data(str(data_dir), seed=1, **{**kwargs, "shots_per_class": 7})
    assert d.row_digests["validation"] == a.row_digests["validation"]
    assert d.row_digests["train"] != a.row_digests["train"]


def test_data_seed_draws_the_images_and_seed_does_when_it_is_unset(data_dir, tmp_path):
    """What --seed and --data_seed's help say: vary --seed with --data_seed fixed, same images."""
    from refilled_hf.config import RefilledConfig
    from refilled_hf.pipeline import select_data

    def digests(**seeds):
        config = RefilledConfig(output_dir=str(tmp_path), dataset=str(data_dir), shots_per_class=5,
                                validation_fraction=0.25, use_cpu=True, **seeds)  # fmt: skip
        return select_data(config, "0-3").row_digests

    assert digests(seed=1, data_seed=7) == digests(seed=2, data_seed=7) == digests(seed=7)
    assert digests(seed=1) != digests(seed=2)


def test_only_the_splits_asked_for_are_built_and_decoded(data_dir):
    kwargs = dict(classes="0-3", shots_per_class=5, validation_fraction=0.25, seed=1)
    full = load_classification_data(str(data_dir), **kwargs)
    for splits in (("test",), ("validation",)):
        part = load_classification_data(str(data_dir), splits=splits, **kwargs)
        for name in ("train", "validation", "test"):
            assert (getattr(part, name) is None) == (name not in splits), (splits, name)
        kept = getattr(part, splits[0])
        assert kept.labels.tolist() == getattr(full, splits[0]).labels.tolist()
        assert kept._decoded is not None, "the split asked for is decoded up front"
        assert (part.info, part.row_digests, part.legacy_fingerprint) == (full.info, full.row_digests,
                                                                           full.legacy_fingerprint)  # fmt: skip
        assert part.selection.keys() == full.selection.keys()
        assert all(np.array_equal(part.selection[k], full.selection[k]) for k in full.selection)
        assert part.fingerprint != full.fingerprint  # (it covers the pixels of the splits built)
    record = full.selection_record()
    assert record["class_names"] == CLASS_NAMES[:4] and record["source_class_ids"] == [0, 1, 2, 3]
    assert (record["seed"], record["validation_fraction"], record["train_images"]) == (1, 0.25, 20)
    with pytest.raises(ValueError, match="splits must be among"):
        load_classification_data(str(data_dir), splits=("val",), **kwargs)


def test_a_class_of_one_image_cannot_give_one_to_validation_whatever_the_fraction():
    from refilled_hf.data import _stratified_split

    labels = np.array([0, 0, 0, 0, 1, 0, 0])
    with pytest.raises(DataError) as refused:
        _stratified_split(labels, 0.1, np.random.default_rng(0), ["cat", "owl"])
    message = str(refused.value)
    assert "to 1 class (training images in brackets): ['owl (1)']" in message
    assert "lower --validation_fraction" not in message and "set it to 0" in message
    keep, held = _stratified_split(labels[:4], 0.25, np.random.default_rng(0), ["cat"])
    assert len(held) == 1 and sorted([*keep, *held]) == [0, 1, 2, 3]


def test_a_data_set_edited_in_place_is_read_again_in_the_same_process(data_dir, tmp_path):
    """The per-process cache kept the first load of a path: a notebook that relabelled its
    parquet file and ran again trained on the old labels."""
    folder = tmp_path / "mine"
    shutil.copytree(data_dir, folder)
    first = load_raw_dataset(str(folder))
    assert load_raw_dataset(str(folder)) is first  # unchanged: cached
    table = pq.read_table(folder / "train.parquet")
    labels = table.column("label").to_pylist()
    relabelled = pa.array([(label + 1) % len(CLASS_NAMES) for label in labels], type=table.schema.field("label").type)
    pq.write_table(table.set_column(table.schema.get_field_index("label"), table.schema.field("label"), relabelled),
                   folder / "train.parquet")  # fmt: skip
    again = load_raw_dataset(str(folder))
    assert again["train"]["label"] == [(label + 1) % len(CLASS_NAMES) for label in labels]
    single = folder / "train.parquet"
    assert load_raw_dataset(str(single)) is load_raw_dataset(str(single))


def test_errors_name_the_problem(data_dir, tmp_path):
    with pytest.raises(DataError, match="shots_per_class=19.*lower it"):
        load_classification_data(str(data_dir), shots_per_class=19, validation_fraction=0.1)
    with pytest.raises(DataError, match="no training image"):
        load_classification_data(str(data_dir), validation_fraction=0.99)
    with pytest.raises(DataError, match="not found"):
        load_raw_dataset(str(tmp_path / "missing.parquet"))
    with pytest.raises(DataError, match="could not be loaded"):
        load_raw_dataset("no-such-user/no-such-dataset-refilled")
    with pytest.raises(DataError, match="Split 'valid'"):
        load_classification_data(str(data_dir), test_split="valid")
    # a data set of train and validation splits (food101's): the split to name is named
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "train.parquet").write_bytes((data_dir / "train.parquet").read_bytes())
    (renamed / "validation.parquet").write_bytes((data_dir / "test.parquet").read_bytes())
    with pytest.raises(DataError, match=r"Split 'test' not in .* \(splits: \['train', 'validation'\]\); fix "
                                        r"`--test_split` \(e.g. `--test_split validation`\), or pass `--test_split "
                                        r"none`"):  # fmt: skip
        load_classification_data(str(renamed))


def test_column_detection(tmp_path):
    odd = write_image_dataset(tmp_path / "odd", per_class_train=2, per_class_test=1, image_column="pic",
                              label_column="target")  # fmt: skip
    with pytest.raises(DataError, match="No image column.*--image_column"):
        load_classification_data(str(odd))
    data = load_classification_data(str(odd), image_column="pic", label_column="target", validation_fraction=0)
    assert data.class_names == CLASS_NAMES
    with pytest.raises(DataError, match="Label column 'label' is not in the data set"):
        load_classification_data(str(odd), image_column="pic", label_column="label")
    raw = load_raw_dataset(str(odd))
    both = raw.map(lambda r: {"img": r["pic"], "image": r["pic"]})
    with pytest.raises(DataError, match="Ambiguous image column"):
        load_classification_data("in-memory", raw=both, label_column="target")
    plural = raw.rename_columns({"pic": "image", "target": "labels"})  # e.g. the beans data set
    assert load_classification_data("in-memory", raw=plural, validation_fraction=0).class_names == CLASS_NAMES
    with pytest.raises(DataError, match=r"Ambiguous label column: the data set has \['label', 'labels'\]"):
        load_classification_data("in-memory", raw=plural.map(lambda r: {"label": r["labels"]}))


def test_cifar_transforms():
    cfg = timm.create_model("cifar_wrn_16_1").pretrained_cfg
    train = build_transform(cfg, train=True)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[1].padding == 4
    evaluation = build_transform(cfg, train=False)
    from PIL import Image

    x = evaluation(Image.new("RGB", (32, 32), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor((1 - cfg["mean"][0]) / cfg["std"][0]))
    big = build_transform(timm.create_model("resnet18").pretrained_cfg, train=True)
    assert "RandomResizedCropAndInterpolation" in [type(t).__name__ for t in big.transforms]


def test_a_selected_class_without_training_images_is_refused_by_name(tmp_path):
    folder = write_image_dataset(tmp_path / "d", per_class_train=4, per_class_test=2)
    raw = load_raw_dataset(str(folder))
    train = raw["train"].filter(lambda row: row["label"] != 4)  # class 4 keeps its name but loses its images
    raw = type(raw)({"train": train, "test": raw["test"]})
    with pytest.raises(DataError, match=rf"Classes \['{CLASS_NAMES[4]}'\] have no image in split 'train'; remove"):
        load_classification_data(str(folder), classes="3-5", raw=raw)
    assert load_classification_data(str(folder), classes="3,5", raw=raw, test_split=None).num_classes == 2


def test_images_too_large_to_keep_are_decoded_per_item_and_take_the_worker_path(data_dir, monkeypatch):
    from refilled_hf import data as data_module
    from refilled_hf.data_device import choose_and_place

    kept = load_classification_data(str(data_dir), classes="0-2", test_split=None)
    # the first images' mean size foretells a split's: one that fits is kept, to its last image
    monkeypatch.setattr(data_module, "_FORESEE_AFTER", 2)
    monkeypatch.setattr(data_module, "_PRELOAD_BYTES", sum(a.nbytes for a in kept.train._decoded))
    assert load_classification_data(str(data_dir), classes="0-2", test_split=None).train._decoded is not None
    monkeypatch.setattr(data_module, "_PRELOAD_BYTES", 100)  # smaller than two 16-px images
    per_item = load_classification_data(str(data_dir), classes="0-2", test_split=None)
    assert kept.train._decoded is not None and per_item.train._decoded is None
    for i in range(len(kept.train)):
        a, b = kept.train[i], per_item.train[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["labels"] == b["labels"]
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    place = dict(flip=True, device="cpu", budget_bytes=2**30, train_transform=None, eval_transform=None)
    assert choose_and_place(per_item, cfg, mode="auto", **place) == (
        "workers", "the decoded images are too large to keep in memory")  # fmt: skip
    with pytest.raises(ValueError, match="--data_path device cannot be used: the decoded images are too large"):
        choose_and_place(per_item, cfg, mode="device", **place)


def test_the_device_path_reports_the_size_of_what_it_keeps():
    from refilled_hf.messages import byte_size

    assert [byte_size(n) for n in (0, 999, 1000, 338_000, 1_572_864, 154 * 2**20, 2_469_606_195, 2**50)] == [
        "0 B", "999 B", "1.0 KiB", "330 KiB", "1.5 MiB", "154 MiB", "2.3 GiB", "1024 TiB"]  # fmt: skip


def test_the_device_path_log_names_the_bytes_it_keeps(data_dir):
    from refilled_hf.data_device import choose_and_place

    data = load_classification_data(str(data_dir), classes="0-2", test_split=None)
    images = len(data.train) + len(data.validation)
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    place = dict(flip=True, device="cpu", budget_bytes=2**30, train_transform=None, eval_transform=None)
    kib = images * 3 * 16 * 16 / 1024  # tens of KiB: "0 MiB" before
    assert 10 <= kib < 1000
    assert choose_and_place(data, cfg, mode="auto", **place) == (
        "device", f"{kib:.0f} KiB of uint8 images on cpu, augmented there (random crop and flip)")  # fmt: skip


def test_a_folder_of_images_by_split_and_class_is_a_data_set(tmp_path):
    """datasets' image-folder layout: train/<class>/*.png; the classes are the folder names, sorted."""
    from PIL import Image

    colours = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200)}
    for split, count in (("train", 5), ("test", 2)):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12 + i, 10), colour).save(tmp_path / split / name / f"{i}.png")
    data = load_classification_data(str(tmp_path), classes="blue,red", validation_fraction=0.0)
    assert data.class_names == ["blue", "red"] and data.dataset_class_names == ["blue", "green", "red"]
    assert (len(data.train), len(data.test)) == (10, 4)
    for split in (data.train, data.test):
        for i in range(len(split)):
            item = split[i]
            colour = colours[data.class_names[item["labels"]]]
            assert tuple(int(c) for c in split._decoded[i][0, 0]) == colour  # each image under its own class


def test_test_images_with_a_training_images_pixels_are_counted_and_named(tmp_path, caplog):
    """The same photo in the training and the test split: its test top-1 is memory. Counted
    on the selected training images only, logged, and warned about from 1 % of the test split."""
    import pyarrow.parquet as pq

    folder = write_image_dataset(tmp_path / "d", per_class_train=8, per_class_test=4)
    train, test = pq.read_table(folder / "train.parquet"), pq.read_table(folder / "test.parquet")
    labels = train.column("label").to_pylist()
    copied = [i for i, label in enumerate(labels) if label in (0, 1)][:3]  # three training images of classes 0-1
    pq.write_table(pa.concat_tables([test, train.take(copied)]), folder / "test.parquet")
    load_raw_dataset.cache_clear()
    with caplog.at_level("INFO", logger="refilled_hf.data"):
        data = load_classification_data(str(folder), classes="0-2", validation_fraction=0.0)
    assert data.info["test_images_in_training"] == 3
    assert "WARNING" in caplog.text and "validation_images_in_training" not in data.info
    assert "3 of the 15 test images (20.0%; split 'test', rows [24, 25, 26])" in caplog.text
    # the same images drawn out of training (other classes, or not among the shots) are not counted
    load_raw_dataset.cache_clear()
    other = load_classification_data(str(folder), classes="2-4", validation_fraction=0.0)
    assert "test_images_in_training" not in other.info
    exact = load_classification_data(str(folder), classes="0-2", validation_fraction=0.0, shots_per_class=1, seed=3)
    chosen = {bytes(exact.train._decoded[i]) for i in range(len(exact.train))}
    expected = sum(bytes(exact.test._decoded[i]) in chosen for i in range(len(exact.test)))
    assert exact.info.get("test_images_in_training", 0) == expected
    # a training split holding one photo four times: the carve puts some copies in validation
    pq.write_table(pa.concat_tables([train] + [train.take(copied[:1])] * 3), folder / "train.parquet")
    load_raw_dataset.cache_clear()
    carved = load_classification_data(str(folder), classes="0-2", validation_fraction=0.5, seed=1)
    chosen = {bytes(carved.train._decoded[i]) for i in range(len(carved.train))}
    expected = sum(bytes(carved.validation._decoded[i]) in chosen for i in range(len(carved.validation)))
    assert 0 < expected < 4 and carved.info["validation_images_in_training"] == expected


def test_images_stored_as_arrays_are_read_as_uint8_and_float_ones_refused(tmp_path):
    """Dataset.from_dict({"image": X}) of a numpy batch stores nested lists: uint8 ones are
    images as they are; float ones (often scaled to [0, 1]) have no stated range."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": pixels, "label": np.arange(12) % 3}).to_parquet(
            str(tmp_path / f"{split}.parquet")
        )
    data = load_classification_data(str(tmp_path), validation_fraction=0.0)
    assert all(np.array_equal(data.train._decoded[i], pixels[data.train.source_rows[i]]) for i in range(12))
    floats = tmp_path / "floats"
    floats.mkdir()
    for split in ("train", "test"):
        rows = {"image": pixels.astype(np.float32) / 255, "label": np.arange(12) % 3}
        datasets.Dataset.from_dict(rows).to_parquet(str(floats / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"does not hold images \(.*float32.*\): arrays of floats, whose range"):
        load_classification_data(str(floats), validation_fraction=0.0)


def _array_splits(folder, images, labels, features=None):
    folder.mkdir()
    for split in ("train", "test"):
        rows = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        rows.to_parquet(str(folder / f"{split}.parquet"))
    return str(folder)


def test_integer_arrays_keep_their_pixels_gray_or_colour_and_any_other_range_or_shape_is_refused(tmp_path):
    """datasets' own cast of array rows read a gray uint8 array as 32-bit pixels, scaled then as a
    16-bit image (0..255 became 0..1: near black), and wrapped colour values above 255 to 8 bits."""
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 4
    gray = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    colour = rng.integers(0, 256, (24, 8, 8, 4), dtype=np.uint8)
    array2d = datasets.Features({"image": datasets.Array2D((8, 8), "uint8"), "label": datasets.Value("int64")})
    cases = {
        "gray": (gray, None, np.repeat(gray[..., None], 3, axis=-1)),
        "gray_int64": (gray.astype(np.int64), None, np.repeat(gray[..., None], 3, axis=-1)),
        "gray_hw1": (gray[..., None], None, np.repeat(gray[..., None], 3, axis=-1)),
        "gray_array2d": (gray, array2d, np.repeat(gray[..., None], 3, axis=-1)),
        "rgb_int16": (colour[..., :3].astype(np.int16), None, colour[..., :3]),
        "rgba": (colour, None, colour[..., :3]),
    }
    for name, (images, features, expected) in cases.items():
        folder = _array_splits(tmp_path / name, images, labels, features)
        # a class subset, its rows shuffled into a validation part and the rest: each keeps its own pixels
        data = load_classification_data(folder, classes=[1, 2, 3], validation_fraction=0.5, seed=3)
        for split in (data.train, data.validation, data.test):
            split.preload()
            assert len(split) and len(split._decoded) == len(split), name
            for i, row in enumerate(split.source_rows):
                assert np.array_equal(split._decoded[i], expected[row]), (name, split.split_name, int(row))
    twelve_bit = gray.astype(np.int64) * 16
    refused = {
        "twelve_bit": (np.repeat(twelve_bit[..., None], 3, axis=3),
                       r"integer pixels from \d+ to \d{4}, outside 0\.\.255.*scale the arrays to uint8"),
        "negative": (gray.astype(np.int16) - 1, r"integer pixels from -1 to \d+, outside 0\.\.255"),
        "channels_first": (colour[..., :3].transpose(0, 3, 1, 2),
                           r"array of shape \(3, 8, 8\).*array\.transpose\(1, 2, 0\)"),
        "five_channels": (np.concatenate([colour, colour[..., :1]], axis=3),
                          r"array of shape \(8, 8, 5\): an image is"),
    }  # fmt: skip
    for name, (images, message) in refused.items():
        folder = _array_splits(tmp_path / name, images, labels)
        with pytest.raises(DataError, match=rf"Split 'train', row \d+: column 'image' holds (an? )?{message}"):
            load_classification_data(folder, validation_fraction=0.0).train.preload()
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    rows = [[[1, 2], [3]], [[1, 2], [3, 4]]]
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": rows, "label": [0, 1]}).to_parquet(str(ragged / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"Split 'train', row 0: column 'image' holds an array of rows of unequal"):
        load_classification_data(str(ragged), validation_fraction=0.0).train.preload()


def test_a_column_of_label_lists_is_refused_as_multi_label(tmp_path):
    pixels = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    for split in ("train", "test"):
        rows = {"image": pixels, "labels": [[i % 3] if i % 2 else [0, 1] for i in range(6)]}
        datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"'labels' holds list<.*a multi-label task; refilled-hf trains single-label"):
        load_classification_data(str(tmp_path), validation_fraction=0.0)


def test_relative_image_paths_are_read_from_the_data_sets_folder(tmp_path, monkeypatch):
    """A CSV (or parquet) of relative image paths means them from its own folder, as a Hub data
    set's paths are from its repo: the run read them from the folder it was started in."""
    from PIL import Image

    folder = tmp_path / "mine"
    (folder / "imgs").mkdir(parents=True)
    for split, count in (("train", 4), ("test", 2)):
        lines = ["image,label"]
        for c, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
            for i in range(count):
                Image.new("RGB", (8, 8), colour).save(folder / "imgs" / f"{split}{c}{i}.png")
                lines.append(f"imgs/{split}{c}{i}.png,{'rb'[c]}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # elsewhere than the data set's folder
    data = load_classification_data("mine", validation_fraction=0.0)
    assert data.class_names == ["b", "r"] and len(data.train) == 8
    red = data.class_names.index("r")
    assert all((tuple(data.train._decoded[i][0, 0]) == (200, 0, 0)) == (data.train.labels[i] == red)
               for i in range(len(data.train)))  # fmt: skip
    single = load_classification_data(str(folder / "train.csv"), validation_fraction=0.0, test_split=None)
    assert len(single.train) == 8 and single.test is None  # one table: the training split, paths from its folder
    monkeypatch.chdir(folder)  # "." is the folder it names
    load_raw_dataset.cache_clear()
    assert len(load_classification_data(".", validation_fraction=0.0).test) == 4
    (folder / "imgs" / "train00.png").unlink()
    load_raw_dataset.cache_clear()
    with pytest.raises(DataError, match=r"row 0 \(no file imgs/train00\.png\).*read from \., the data set's folder"):
        load_classification_data(".", validation_fraction=0.0)


def test_a_class_only_the_test_split_has_is_refused_with_the_selection_of_the_others(tmp_path):
    """The classes are every folder of every split; with no --classes given, the fix is the
    selection of the others, not "remove them from --classes"."""
    from PIL import Image

    for split, names in (("train", ("cat", "dog", "owl")), ("test", ("cat", "dog", "owl", "zebra"))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (9 * i, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    with pytest.raises(DataError, match=r"Classes \['zebra'\] have no image in split 'train'; select the others: "
                                        r"`--classes 0-2`\.$"):  # fmt: skip
        load_classification_data(str(tmp_path), validation_fraction=0.0)
    with pytest.raises(DataError, match=r"\['zebra'\] .*; remove them from `--classes`\.$"):
        load_classification_data(str(tmp_path), classes="cat,zebra", validation_fraction=0.0)
    data = load_classification_data(str(tmp_path), classes="0-2", validation_fraction=0.0)
    assert data.class_names == ["cat", "dog", "owl"] and len(data.test) == 6


def test_an_image_file_that_cannot_be_decoded_is_named_with_the_reason(tmp_path):
    """In a folder data set the file is what to fix; in a table, the row (its bytes hold the image)."""
    from PIL import Image

    for split, count in (("train", 3), ("test", 1)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (9 * i, 0, 0)).save(tmp_path / split / name / f"{i}.jpg")
    broken = tmp_path / "train" / "dog" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DataError) as refused:
        load_classification_data(str(tmp_path), validation_fraction=0.0)
    message = str(refused.value)
    assert f"row 4 ({broken}: OSError: " in message and message.endswith("Fix or remove those files.")


def test_class_folders_inside_a_folder_of_each_split_are_a_layout(tmp_path):
    """train/images/<class>/: one folder holding the class folders in each split is not nested;
    a table beside them does not make it a table of image paths."""
    from PIL import Image

    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / "images" / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / "images" / name / f"{i}.png")
    (tmp_path / "train_results.csv").write_text("run,top1\na,50\n")  # a table of the user's own: not the data
    data = load_classification_data(str(tmp_path), validation_fraction=0.0)
    assert data.class_names == ["cat", "dog"] and (len(data.train), len(data.test)) == (4, 4)


def test_splits_whose_files_name_the_label_ids_differently_are_refused(tmp_path):
    """class_encode_column on a test split that lacks class 'a' names its ids [b, c]; datasets
    reads it with train's [a, b, c], so every test 'b' became an 'a' (and 'c' a 'b')."""

    def split(labels: list[str], names: list[str]) -> datasets.Dataset:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        images = [np.full((8, 8, 3), 40 * names.index(label), np.uint8) for label in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    split(["a", "b", "c"] * 3, ["a", "b", "c"]).to_parquet(str(tmp_path / "train.parquet"))
    split(["b", "c"] * 2, ["b", "c"]).to_parquet(str(tmp_path / "test.parquet"))
    message = r"name the ids of label column 'label' differently: test\.parquet as \['b', 'c'\], train\.parquet as"
    with pytest.raises(DataError, match=message):
        load_classification_data(str(tmp_path), validation_fraction=0.0)
    split(["b", "c"] * 2, ["a", "b", "c"]).to_parquet(str(tmp_path / "test.parquet"))  # the same names: read
    load_raw_dataset.cache_clear()
    data = load_classification_data(str(tmp_path), validation_fraction=0.0)
    assert [data.class_names[i] for i in data.test.labels] == ["b", "c"] * 2


@pytest.mark.parametrize("layout", ["every class", "one class"])
def test_images_in_sub_folders_of_their_class_folders_are_refused(layout, tmp_path):
    """datasets labels an image by the folder that holds it: train/cat/day1/0.png is a 'day1'
    (the classes were day1, day2, not cat and dog, and a run trained on them exited 0)."""
    from PIL import Image

    for split in ("train", "test"):
        for name in ("cat", "dog"):
            subfolders = ["day1", "day2"] if layout == "every class" or name == "cat" else [""]
            for sub in subfolders:
                (tmp_path / split / name / sub).mkdir(parents=True, exist_ok=True)
                for i in range(2):
                    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / name / sub / f"{i}.png")
    message = r"the folder that holds them: train/cat/day1/0\.png is labelled 'day1', not 'cat'.* split 'train'"
    with pytest.raises(DataError, match=message):
        load_classification_data(str(tmp_path), validation_fraction=0.0)
    # a metadata file labels the images itself: the folders then do not matter
    rows = [{"file_name": p.relative_to(tmp_path / "train").as_posix(),
             "species": p.parts[-3 if p.parent.name.startswith("day") else -2]}
            for p in sorted((tmp_path / "train").rglob("*.png"))]  # fmt: skip
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    load_raw_dataset.cache_clear()
    assert load_raw_dataset(str(tmp_path / "train"))["train"].unique("species") == ["cat", "dog"]


def test_sixteen_bit_images_are_scaled_to_eight_bits_and_float_ones_refused(tmp_path):
    """Pillow's convert("RGB") clips a 16-bit channel at 255: a 16-bit image read that way is
    nearly all white (99.6 % of this gradient), and trained on as such without a word."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sixteen = {name: rng.integers(0, 65536, size=(6, 7), dtype=np.uint16) for name in ("a", "b")}
    for split in ("train", "test"):
        for name, values in sixteen.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(values).save(tmp_path / split / name / f"{i}.png")  # a 16-bit PNG
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode in ("I;16", "I")  # (Pillow 10.0: "I")
    data = load_classification_data(str(tmp_path), validation_fraction=0.0)
    for i in range(len(data.train)):
        expected = np.floor(sixteen[data.class_names[int(data.train.labels[i])]] / 257 + 0.5).astype(np.uint8)
        assert np.array_equal(data.train._decoded[i], np.repeat(expected[..., None], 3, axis=2))
    # floating-point pixels: no one reading of their range, refused by split and row
    Image.fromarray(rng.random((6, 7), dtype=np.float32)).save(tmp_path / "train" / "b" / "0.tiff")
    load_raw_dataset.cache_clear()
    with pytest.raises(DataError, match=r"Split 'train', row \d+: floating-point pixels \(Pillow mode F\)"):
        load_classification_data(str(tmp_path), validation_fraction=0.0)


def test_a_gray_integer_array_that_datasets_encoded_keeps_its_pixels_and_a_16_bit_png_its_scale(tmp_path):
    """datasets' Image feature stores a gray int64 array as a 32-bit TIFF (Pillow mode I) of its
    0..255 values; read as a 16-bit image they were near black. A 16-bit PNG (opened as mode I by
    Pillow 10.0) is scaled over 16 bits even where its values all lie below 256."""
    import io
    import warnings

    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 8, 8))  # int64
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for split in ("train", "test"):
        with warnings.catch_warnings():  # (datasets: "Downcasting array dtype int64 to int32")
            warnings.simplefilter("ignore", UserWarning)
            rows = datasets.Dataset.from_dict({"image": list(gray), "label": np.arange(12) % 3}, features=features)
        rows.to_parquet(str(tmp_path / f"{split}.parquet"))
    stored = pq.read_table(tmp_path / "train.parquet").column("image")[0].as_py()["bytes"]
    assert (Image.open(io.BytesIO(stored)).format, Image.open(io.BytesIO(stored)).mode) == ("TIFF", "I")
    data = load_classification_data(str(tmp_path), validation_fraction=0.0)
    for i, row in enumerate(data.train.source_rows):
        assert np.array_equal(data.train._decoded[i], np.repeat(gray[row, ..., None], 3, axis=-1).astype(np.uint8))
    dark = tmp_path / "dark"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (dark / split / name).mkdir(parents=True)
            Image.fromarray(gray[:2].reshape(16, 8).astype(np.uint16)).save(dark / split / name / "0.png")
    data = load_classification_data(str(dark), validation_fraction=0.0)
    scaled = np.floor(gray[:2].reshape(16, 8) / 257 + 0.5).astype(np.uint8)
    assert np.array_equal(data.train._decoded[0], np.repeat(scaled[..., None], 3, axis=-1))


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A phone stores a portrait photo landscape with an EXIF orientation tag; datasets and
    transformers' load_image turn it upright: training on it sideways would not match them."""
    from PIL import ExifTags, Image

    from refilled_hf.image_decoding import rgb_array

    stored = np.zeros((4, 6, 3), np.uint8)  # 4 high, 6 wide, a white left column
    stored[:, 0] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "photo.jpg") as image:
        upright = rgb_array(image)
    assert upright.shape == (6, 4, 3)  # 6 high, 4 wide
    assert upright[0].min() > 200 and upright[2:].max() < 60  # the white column is now the top row
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=100)
    with Image.open(tmp_path / "plain.jpg") as image:
        assert rgb_array(image).shape == (4, 6, 3)


def test_a_hub_data_set_that_cannot_be_fetched_says_how_to_read_the_cache_without_retries(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):  # what datasets raises without network
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as err:
            raise ConnectionError("Couldn't reach 'someone/flowers' on the Hub (LocalEntryNotFoundError)") from err

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for offline_mode, hinted in ((False, True), (True, False)):  # (set, it already reads the cache at once)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_mode)
        load_raw_dataset.cache_clear()
        with pytest.raises(DataError, match="Data set 'someone/flowers' could not be loaded") as raised:
            load_raw_dataset("someone/flowers")
        assert ("HF_HUB_OFFLINE=1 reads what the Hub cache holds at once" in str(raised.value)) is hinted
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad config")))
    load_raw_dataset.cache_clear()
    with pytest.raises(DataError) as raised:
        load_raw_dataset("someone/flowers")
    assert "HF_HUB_OFFLINE" not in str(raised.value)
