"""Export (timm + transformers), the model card, and the push path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import tiny_recipe, write_image_dataset, write_random_teacher
from huggingface_hub import ModelCard

from refilled_hf.backbone import ModelLoadError, load_timm_model, weights_origin
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.hub import TRAINING_DATA_KEY, HubPushError, export_model, push_folder
from refilled_hf.model_card import (
    card_for_repo,
    check_comparable,
    render_model_card,
    student_alone_margin,
    trainer_card,
)
from refilled_hf.pipeline import run_distillation


@pytest.mark.parametrize("name,size", [("cifar_wrn_16_1", 32), ("cifar_wrn_40_1", 32), ("resnet18", 64)])
def test_export_loads_identically_in_timm_and_transformers(name, size, tmp_path):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    record = {"dataset": "uoft-cs/cifar100", "class_names": ["a", "b", "c", "d"], "row_digests": {"train": "0" * 64}}
    folder = export_model(model, tmp_path / "m", label_names=["a", "b", "c", "d"],
                          data_config={"input_size": (3, size, size)}, training_data=record, license="mit")  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    # these weights are not the ones timm's registry tags for the architecture (resnet18: 'a1_in1k', apache-2.0)
    assert "tag" not in config["pretrained_cfg"] and config["pretrained_cfg"]["license"] == "mit"
    assert config[TRAINING_DATA_KEY] == record  # refilled-hf's own key, ignored by timm and transformers
    assert config["num_classes"] == 4 and config["label_names"] == ["a", "b", "c", "d"]
    assert "num_classes" not in config.get("model_args", {}), "breaks transformers' TimmWrapper"
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x)
        via_hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()(pixel_values=x).logits
    assert torch.equal(via_timm, expected)
    torch.testing.assert_close(via_hf, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [16, 72])
def test_timm_and_transformers_preprocess_a_runs_export_as_the_run_evaluated_it(size, data_dir, tmp_path):
    """At 64 px or less a run resizes each image to the square input (its aspect ratio not
    kept); timm's default for the export, resize and centre crop, fed a non-square photo
    another part of it than the measured top-1 saw. Larger inputs use timm's transforms."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from refilled_hf.data import build_transform

    run_distillation(RefilledConfig(**tiny_recipe(data_dir, tmp_path / "run", method="ce", max_steps=1,
                                                  image_size=size, per_device_eval_batch_size=4)))  # fmt: skip
    folder = tmp_path / "run" / "model"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    measured = build_transform(model.pretrained_cfg, train=False)(photo)  # what the run and `evaluate` feed it
    via_timm = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)(photo)
    via_hf = AutoImageProcessor.from_pretrained(str(folder))(photo, return_tensors="pt")["pixel_values"][0]
    assert measured.shape == (3, size, size)
    torch.testing.assert_close(via_timm, measured, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_hf, measured, rtol=0, atol=1e-5)


def test_export_loads_in_a_fresh_process(tmp_path):
    model = timm.create_model("cifar_wrn_16_1", num_classes=3).eval()
    folder = export_model(model, tmp_path / "m", label_names=["x", "y", "z"])
    torch.save(torch.randn(1, 3, 32, 32), tmp_path / "x.pt")
    code = (
        "import json, sys, torch, refilled_hf, timm\n"
        f"m = timm.create_model('local-dir:{folder}', pretrained=True).eval()\n"
        f"x = torch.load('{tmp_path / 'x.pt'}')\n"
        "print(json.dumps(m(x).tolist()), m.pretrained_cfg['label_names'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    logits = torch.tensor(json.loads(proc.stdout.split("\n")[0].rsplit(" [", 1)[0]))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.load(tmp_path / "x.pt")), rtol=0, atol=1e-6)
    assert "['x', 'y', 'z']" in proc.stdout


def test_unregistered_architecture_says_to_import_refilled_hf(tmp_path):
    folder = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "m", label_names=["a", "b"])
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "cifar_wrn_99_9"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="import refilled_hf"):
        load_timm_model(f"local-dir:{folder}")


def _fake_results(method="refilled", teacher="hf-hub:someone/teacher-net", dataset="uoft-cs/cifar100", **schedule):
    results = {
        "method": method,
        "student": "cifar_wrn_16_1",
        "teacher": teacher,
        "dataset": dataset,
        "classes": "50-99",
        "teacher_classes": "0-49",
        "class_names": ["apple", "bee"],
        "data": {"train_images": 100, "validation_images": 10, "test_images": 200, "shots_per_class": 50},
        "world_size": 1,
        "image_size": 32,
        "data_fingerprint": "f" * 64,
        "schedule": {**RefilledConfig(output_dir="o").final_stage_schedule(), **schedule},
        "final": {"test_top1": 71.234, "test_top5": 95.5, "validation_top1": 70.0, "test_samples": 200,
                  "validation_samples": 10, "train_metrics": {"epoch": 200.0}},
    }  # fmt: skip
    if method == "refilled":
        results["stage1"] = {"test_ncm_top1": 55.557, "train_metrics": {"epoch": 200.0}}
        results["distill_weight"] = 10.0
    return results


def test_model_card_metadata_and_content():
    recipe = RefilledConfig(teacher="hf-hub:someone/teacher-net", hub_token="hf_SECRET", output_dir="o").to_recipe()
    baseline = _fake_results(method="ce", teacher=None)
    baseline["final"]["test_top1"] = 60.0
    text = render_model_card(_fake_results(), recipe, architecture="cifar_wrn_16_1", repo_id="me/student",
                             baselines=[baseline])  # fmt: skip
    card = ModelCard(text)
    data = card.data
    assert data.library_name == "timm" and data.license == "apache-2.0"
    assert {"image-classification", "knowledge-distillation", "refilled"} <= set(data.tags)
    assert data.datasets == ["uoft-cs/cifar100"] and data.base_model == "someone/teacher-net"
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    values = {r.metric_name: r.metric_value for r in data.eval_results}
    # this model's results only: stage 1's NCM accuracy (55.56) measures the stage-1 student, in the table
    assert values == {"Test top-1 accuracy": 71.23, "Test top-5 accuracy": 95.5}
    assert "import refilled_hf" in text and "AutoModelForImageClassification" in text
    assert "refilled-hf evaluate --model hf-hub:me/student --dataset uoft-cs/cifar100\n" in text
    assert "on the `test` split of `uoft-cs/cifar100`" in text and "(200 images)" in text
    assert "| refilled (this model) | 200 + 200 | 71.23 | 95.50 | 55.56 | 70.00 |" in text
    assert "| ce | 200 | 60.00 |" in text
    assert "same training, validation and test images" in text and "trained otherwise" not in text
    assert "stage 1 matches" in text and "200 epochs" in text and "lambda 10 x the" in text
    assert "200 epochs, lr 0.1,\n  x0.2 at epochs 100,140,180.\n" in text
    assert "Optimizer: SGD with Nesterov momentum 0.9, coupled weight decay 0.0005; global batch 128" in text
    assert "Teacher: `hf-hub:someone/teacher-net`, trained on classes `0-49`" in text  # (its architecture unrecorded)
    named = render_model_card({**_fake_results(), "teacher_architecture": "resnet50"}, recipe,
                              architecture="cifar_wrn_16_1")  # fmt: skip
    assert "Teacher: `hf-hub:someone/teacher-net` (a `resnet50`), trained on classes `0-49`" in named
    plain = RefilledConfig(teacher="resnet50", teacher_checkpoint="w.safetensors", output_dir="o").to_recipe()
    own_name = {**_fake_results(), "teacher": "resnet50", "teacher_architecture": "resnet50"}
    assert "Teacher: `resnet50`, trained" in render_model_card(own_name, plain, architecture="cifar_wrn_16_1")
    assert "tau2: 2.0" in text and "distill_weight: null" in text  # the recipe, defaults included
    assert "ye2020refilled" in text
    assert "hf_SECRET" not in text and "hub_token" not in text


def test_card_states_what_the_run_did_that_the_defaults_do_not():
    config = RefilledConfig(teacher="hf-hub:someone/teacher-net", output_dir="o", optim="adamw_torch",
                            warmup_steps=0.05, max_grad_norm=1.0, label_smoothing_factor=0.1, max_steps=3,
                            gradient_accumulation_steps=2, distill_weight_schedule="linear",
                            distill_images="teacher_correct", stage1_epochs=10, stage2_epochs=20,
                            test_split="valid", bf16=True, label_column="species")  # fmt: skip
    results = _fake_results(**config.final_stage_schedule())
    results["stage1"]["train_metrics"]["epoch"] = 0.5
    results["final"]["train_metrics"]["epoch"] = 20.0
    text = render_model_card(results, config.to_recipe(), architecture="cifar_wrn_16_1")
    assert "transformers' `adamw_torch`, weight decay 0.0005; global batch 256 (128 per device x 1 process(es) x 2 " \
           "accumulation steps)" in text  # fmt: skip
    assert "SGD" not in text.split("## Training")[1].split("The full recipe")[0]
    assert "warm-up over the first 5% of each stage" in text and "gradients clipped to norm 1.0" in text
    assert "label smoothing 0.1" in text
    assert "0.5 of 10 planned epochs (stopped by --max_steps)" in text and ", 20 epochs, lr" in text
    # the default milestones lie beyond these 20 epochs: the learning rate never decayed
    assert "constant (milestones 100,140,180 never reached in its 20 epochs)." in text
    partly = render_model_card(results, {**config.to_recipe(), "stage2_milestones": "10,20,30"},
                               architecture="cifar_wrn_16_1")  # fmt: skip
    assert "x0.2 at epoch 10 (milestones 20,30 never reached in its 20 epochs)." in partly
    assert "lambda 10 (decaying to 0 over stage 2, linear)" in text
    assert "only on the images whose teacher local" in text
    assert "on the `valid` split" in text and "--test_split valid" in text
    # the command that measures it again reads the same column, under the same mixed precision
    assert "--dataset uoft-cs/cifar100 --test_split valid --label_column species --bf16 true\n" in text
    assert {r.dataset_split for r in ModelCard(text).data.eval_results} == {"valid"}


def test_card_lists_how_each_baseline_trained_otherwise():
    this = _fake_results()
    this["distill_weight_search"] = {"candidates": [
        {"distill_weight": 1.0, "validation_top1": 60.0, "train_metrics": {"epoch": 200.0}},
        {"distill_weight": 10.0, "validation_top1": 70.0, "train_metrics": {"epoch": 200.0}},
    ]}  # fmt: skip
    longer = _fake_results(method="ce", teacher=None, learning_rate=0.05)
    longer["final"]["train_metrics"]["epoch"] = 400.0
    kd = _fake_results(method="kd", teacher="hf-hub:someone/same-classes")
    kd["student"], kd["image_size"] = "resnet18", 64
    other_lambda = _fake_results()
    other_lambda["distill_weight"] = 1.0
    text = render_model_card(this, {"stage2_epochs": 200}, architecture="cifar_wrn_16_1",
                             baselines=[longer, kd, other_lambda])  # fmt: skip
    assert "| refilled (lambda 1) | 200 + 200 |" in text
    assert "| refilled (this model) | 200 + 2 x 200 |" in text
    assert "top-1 lambda 1: 60.00, lambda 10: 70.00." in text and "is optimistic" in text
    assert "| ce | 400 |" in text
    assert "| kd (student `resnet18`, teacher `hf-hub:someone/same-classes`, 64 px) | 200 |" in text
    assert "- ce trained otherwise than this model's last stage in: learning_rate 0.05 (this model: 0.1)." in text
    assert "- kd trained otherwise" not in text


def test_card_without_a_test_split_claims_no_test_accuracy():
    results = _fake_results(dataset="/nonexistent/data")
    results["final"] = {"validation_top1": 70.0, "validation_samples": 10, "train_metrics": {"epoch": 200.0}}
    results["stage1"] = {"validation_ncm_top1": 50.0, "train_metrics": {"epoch": 200.0}}
    results["distill_weight_search"] = {"candidates": [{"distill_weight": 1.0, "validation_top1": 70.0}]}
    text = render_model_card(results, {}, architecture="cifar_wrn_16_1")
    assert not ModelCard(text).data.eval_results and "model-index" not in text
    assert "no test split: the only measurement is the validation top-1, on 10 images" in text
    assert "so it is optimistic" in text and "test split of" not in text
    assert "--dataset <your copy of data> --split validation\n" in text  # evaluate measures test unless told
    assert "The test split was evaluated" not in text
    assert "Its validation top-1, the best of the candidates, is optimistic (the run had no test split)." in text
    alone = _fake_results(dataset="/nonexistent/data")
    alone["final"] = results["final"]
    alone["distill_weight_search"] = results["distill_weight_search"]
    alone["student_alone"] = {"exported": True, "epochs": 400.0, "validation_top1": 71.0, "stage2_milestones": "200"}
    text = render_model_card(alone, {"stage1_epochs": 200, "stage2_epochs": 200}, architecture="cifar_wrn_16_1")
    assert "so it was exported instead.\n" in text and "The test split was evaluated" not in text


def test_card_lists_class_names_that_hold_commas_so_that_the_list_reads_back():
    results = _fake_results()
    assert "**Classes** (2): apple, bee\n" in render_model_card(results, {}, architecture="cifar_wrn_16_1")
    results["class_names"] = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    results["data"]["test_classes_without_images"] = ["great white shark", "tench, Tinca tinca"]
    text = render_model_card(results, {}, architecture="cifar_wrn_16_1")
    assert "**Classes** (3): tench, Tinca tinca; goldfish, Carassius auratus; great white shark\n" in text
    assert "(great white shark; tench, Tinca tinca): its accuracy" in text
    assert "**Classes** (1): tench, Tinca tinca\n" in trainer_card("cifar_wrn_16_1", "ce", ["tench, Tinca tinca"])


def test_card_says_how_many_test_images_are_training_images():
    results = _fake_results()
    assert "pixels of a training image" not in render_model_card(results, {}, architecture="cifar_wrn_16_1")
    results["data"]["test_images_in_training"] = 3
    text = render_model_card(results, {}, architecture="cifar_wrn_16_1")
    assert "(200 images), once, at the end of training. 3 of these images have exactly the pixels of a training" in text


def test_a_baseline_on_other_images_or_without_a_record_is_refused():
    this = _fake_results()
    other = _fake_results(method="ce", teacher=None)
    check_comparable(this, [other])
    other["data_fingerprint"] = "0" * 64
    with pytest.raises(ConfigError, match="used other images than this one"):
        check_comparable(this, [other])
    del other["data_fingerprint"]
    with pytest.raises(ConfigError, match=r"earlier refilled-hf\): rerun it"):
        check_comparable(this, [other])


def test_card_says_where_the_teacher_and_the_student_weights_came_from():
    """A card named the teacher `resnet18` alone, whether its weights were timm's pretrained
    ones or a file of the user's, and never said what the student started from."""
    assert weights_origin("resnet18", None, pretrained=True) == "timm's pretrained weights `timm/resnet18.a1_in1k`"
    tagged = weights_origin("resnet18.tv_in1k", None, pretrained=True)
    assert tagged == "timm's pretrained weights `timm/resnet18.tv_in1k`"
    assert weights_origin("resnet18", "runs/t/w.pth", pretrained=True) == "the weights of `runs/t/w.pth`"
    assert weights_origin("cifar_wrn_16_1", None, pretrained=False) == "random initialization"
    assert weights_origin("local-dir:/x/y", None, pretrained=True) is None  # the name says where they lie
    assert weights_origin("hf-hub:me/net", None, pretrained=False) is None
    recipe = RefilledConfig(teacher="resnet50", teacher_checkpoint="w.safetensors", output_dir="o").to_recipe()
    results = {**_fake_results(), "teacher": "resnet50", "teacher_architecture": "resnet50",
               "teacher_weights_origin": "the weights of `w.safetensors`",
               "student_weights_origin": "random initialization"}  # fmt: skip
    text = render_model_card(results, recipe, architecture="cifar_wrn_16_1")
    assert "- Teacher: `resnet50` with the weights of `w.safetensors`, trained on classes `0-49`" in text
    assert "- Student: `cifar_wrn_16_1` at 32 px, trained from random initialization; classes" in text
    started = render_model_card({**results, "student_weights_origin": "the weights of `s.pth`"}, recipe,
                                architecture="cifar_wrn_16_1")  # fmt: skip
    assert "- Student: `cifar_wrn_16_1` at 32 px, trained from the weights of `s.pth`; classes" in started
    # a student that started from a Hub model's weights is a fine-tune of it: that is its base_model
    # (the Hub reads it so), not the teacher it was distilled from (someone/teacher-net, on the Hub too)
    tuned = ModelCard(render_model_card({**_fake_results(), "student": "hf-hub:timm/resnet18.a1_in1k"}, recipe,
                                        architecture="resnet18"))  # fmt: skip
    assert tuned.data.base_model == "timm/resnet18.a1_in1k"
    # a run of an earlier release recorded neither: the card says nothing of them
    earlier = render_model_card({**_fake_results(), "teacher": "resnet50"}, recipe, architecture="cifar_wrn_16_1")
    assert "- Teacher: `resnet50`, trained on classes" in earlier and "trained from" not in earlier


def test_card_for_a_local_teacher_and_data_has_no_hub_links():
    card = ModelCard(render_model_card(_fake_results(teacher="local-dir:/x/y", dataset="/nonexistent/data"), {},
                                       architecture="resnet18"))  # fmt: skip
    assert card.data.base_model is None and card.data.datasets is None
    assert "import refilled_hf" not in card.text
    assert "## How to use\n\nWith timm:" in card.text  # no blank lines left by the CIFAR-only paragraph


def test_a_student_alone_exported_by_a_margin_within_noise_is_not_said_to_show_the_teacher_useless():
    """Exported for 1 more image right of 50 on validation, the card said "so the teacher's
    knowledge did not help on this task"; the margin is now set against the noise of the split."""
    import math

    def run(alone_top1: float, samples: int) -> dict:
        results = _fake_results()
        results["final"]["validation_top1"] = alone_top1
        candidates = [{"distill_weight": 1.0, "stage_dir": "stage2-lambda1", "validation_top1": 14.0},
                      {"distill_weight": 10.0, "stage_dir": "stage2-lambda10", "diverged": "loss nan"}]  # fmt: skip
        results["distill_weight_search"] = {"selected": 1.0, "candidates": candidates}
        results["student_alone"] = {
            "epochs": 400.0,
            "stage2_milestones": "200,280,360",
            "stage_dir": "student-alone",
            "validation_top1": alone_top1,
            "validation_samples": samples,
            "exported": True,
        }
        return results  # fmt: skip

    recipe = RefilledConfig(output_dir="o").to_recipe()
    small = run(16.0, 50)
    margin = student_alone_margin(small["student_alone"], small["distill_weight_search"]["candidates"])
    error = 100 * math.sqrt(0.16 * 0.84 / 50)  # one standard error of a top-1 of 16 % on 50 images
    assert margin == {"points": 2.0, "images": 1, "samples": 50, "standard_error": pytest.approx(error),
                      "clear": False}  # fmt: skip
    card = render_model_card(small, recipe, architecture="cifar_wrn_16_1")
    assert ("it beat every REFILLED candidate on the validation split, by 1 image of 50 (2.00 points): less than two "
            "standard errors of a top-1 measured on 50 images (one is about 5.2 points), so this does not show that "
            "the teacher could not help.") in card  # fmt: skip
    assert "did not help" not in card

    clear = run(34.0, 500)  # 100 images more right of 500: about 9 standard errors
    margin = student_alone_margin(clear["student_alone"], clear["distill_weight_search"]["candidates"])
    assert margin["images"] == 100 and margin["clear"]
    card = render_model_card(clear, recipe, architecture="cifar_wrn_16_1")
    assert (
        "on the validation split, by 100 images of 500 (20.00 points), so the teacher's knowledge did not help "
        "on this task."
    ) in card
    # a perfect score still has a noise floor of one image
    perfect = student_alone_margin({"validation_top1": 100.0, "validation_samples": 50}, [{"validation_top1": 98.0}])
    assert perfect["standard_error"] == 2.0 and not perfect["clear"]
    assert student_alone_margin({"validation_top1": 50.0, "validation_samples": 9}, [{"diverged": "nan"}]) is None


def test_card_has_no_runs_of_blank_lines_and_counts_one_epoch_in_the_singular():
    recipe = {**RefilledConfig(teacher="hf-hub:someone/teacher-net", output_dir="o", stage1_epochs=1,
                               stage2_epochs=1).to_recipe()}  # fmt: skip
    results = _fake_results()
    results["stage1"]["train_metrics"]["epoch"] = 1.0
    results["final"]["train_metrics"]["epoch"] = 1.0
    for architecture in ("cifar_wrn_16_1", "resnet18"):
        text = render_model_card(results, recipe, architecture=architecture)
        assert "\n\n\n" not in text, architecture
        assert "1 epochs" not in text and "margin 0.2, 1 epoch, lr" in text
        assert "never reached in its 1 epoch)" in text


class Recorder:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def whoami(self, token=None):
        self.calls.append(("whoami", None, {"token": token}))
        return {"name": "me"}

    def create_commit(self, repo_id, operations, **kwargs):
        """Records each file as uploaded: its path in the repo and its bytes."""
        files = {}
        for op in operations:
            content = op.path_or_fileobj
            files[op.path_in_repo] = Path(content).read_bytes() if isinstance(content, str) else content
        self.calls.append(("create_commit", repo_id, {**kwargs, "files": files}))
        return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    rec = Recorder()
    monkeypatch.setattr(huggingface_hub, "create_repo", rec.create_repo)
    monkeypatch.setattr(huggingface_hub, "create_commit", rec.create_commit)
    monkeypatch.setattr(huggingface_hub, "whoami", rec.whoami)
    return rec


@pytest.mark.slow
def test_run_pushes_the_export_from_the_main_process(hub, tmp_path, caplog, capsys):
    data = write_image_dataset(tmp_path / "data")
    teacher = write_random_teacher(tmp_path / "t")
    ce = run_distillation(RefilledConfig(**tiny_recipe(data, tmp_path / "ce", method="ce", stage2_epochs=1)))
    recipe = tiny_recipe(data, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher}",
                         push_to_hub=True, hub_model_id="me/student", hub_private_repo=True,
                         hub_token="hf_SECRET_TOKEN", compare_runs=str(tmp_path / "ce"))  # fmt: skip
    with caplog.at_level("INFO"):
        results = run_distillation(RefilledConfig(**recipe))
    # the login is checked before training; the repo is created and filled after it
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "create_commit"]
    assert hub.calls[0][2]["token"] == "hf_SECRET_TOKEN"
    assert hub.calls[1][1] == "me/student" and hub.calls[1][2]["private"] is True
    assert hub.calls[1][2]["token"] == "hf_SECRET_TOKEN"
    export = tmp_path / "run" / "model"
    assert hub.calls[2][2]["files"] == {p.name: p.read_bytes() for p in export.iterdir()}  # the card as written
    card = ModelCard.load(str(tmp_path / "run" / "model" / "README.md"))
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["Test top-1 accuracy"] == round(results["final"]["test_top1"], 2)
    assert set(values) == {"Test top-1 accuracy"}  # 3 classes: no top-5; stage 1's NCM only in the table
    assert f" | {results['stage1']['test_ncm_top1']:.2f} | " in card.text
    assert f"| ce | 1 | {ce['final']['test_top1']:.2f} |" in card.text  # it trained 1 epoch, stated
    assert "| refilled (this model) | 2 + 2 |" in card.text and "trained otherwise" not in card.text
    assert "hf-hub:me/student" in card.text
    written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.suffix in {".json", ".md"})
    assert "hf_SECRET_TOKEN" not in written + caplog.text + capsys.readouterr().out
    # the job run again after the run ended (say its push was cut): the model is pushed, nothing trained
    hub.calls.clear()
    again = run_distillation(RefilledConfig(**{**recipe, "resume_from_checkpoint": "true"}))
    assert again["final"] == results["final"]
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "create_commit"]


def test_push_requires_a_repo_id_before_training(tmp_path):
    recipe = tiny_recipe(tmp_path / "nodata", tmp_path / "run", method="ce", push_to_hub=True)
    with pytest.raises(ConfigError, match="hub_model_id"):
        run_distillation(RefilledConfig(**recipe))


def test_push_is_refused_before_training_when_the_hub_refuses_the_login(monkeypatch, tmp_path):
    """Offline or with a bad token, a --push_to_hub run would train for hours and then fail
    to push: it is refused first, without the token in the message, nothing written."""
    import huggingface_hub

    def refuse(token=None):
        raise OSError(f"401 Unauthorized for token {token}")

    monkeypatch.setattr(huggingface_hub, "whoami", refuse)
    data = write_image_dataset(tmp_path / "data")
    recipe = tiny_recipe(data, tmp_path / "run", method="ce", push_to_hub=True, hub_model_id="me/student",
                         hub_token="hf_SECRET_TOKEN")  # fmt: skip
    with pytest.raises(HubPushError, match=r"did not accept this login.*refilled-hf push <output_dir>/model") as info:
        run_distillation(RefilledConfig(**recipe))
    assert "hf_SECRET_TOKEN" not in str(info.value) and "<token>" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_push_command_sends_repo_folder_and_private_flag(hub, tmp_path, capsys):
    from refilled_hf.cli import main

    folder = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "m", label_names=["a", "b"])
    assert main(["push", str(folder), "--repo-id", "me/model", "--private", "true", "--token", "hf_XYZ"]) == 0
    assert hub.calls[0][1] == "me/model" and hub.calls[0][2]["private"] is True
    assert hub.calls[1][1] == "me/model" and hub.calls[1][2]["token"] == "hf_XYZ"
    assert hub.calls[1][2]["files"] == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "hf_XYZ" not in capsys.readouterr().out
    # distill's names for the same settings work too
    hub.calls.clear()
    assert main(["push", str(folder), "--hub_model_id", "me/other", "--hub_private_repo", "true"]) == 0
    assert hub.calls[0][1] == "me/other" and hub.calls[0][2]["private"] is True


def test_push_uploads_the_model_not_hidden_files_nor_a_run_written_beside_it(hub, tmp_path, caplog):
    """Every file under the folder went to the Hub: a notebook's checkpoints, the lock file
    and, where a run was written into the export folder, its checkpoints (optimizer states,
    pickled training arguments) and records."""
    import json

    from refilled_hf.hub import push_folder

    folder = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "m", label_names=["a", "b"])
    exported = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept: the user's own file")
    (folder / "extra" / ".ipynb_checkpoints").mkdir()
    (folder / "extra" / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("no")
    (folder / ".refilled-hf.lock").write_text("123")
    (folder / "stage2" / "checkpoint-3").mkdir(parents=True)
    (folder / "stage2" / "checkpoint-3" / "optimizer.pt").write_bytes(b"state")
    (folder / "results.json").write_text("{}")
    (folder / "run.json").write_text(json.dumps({"identity": {}, "outputs": ["stage2", "model", "results.json",
                                                                             "run.json"]}))  # fmt: skip
    with caplog.at_level("INFO", logger="refilled_hf.hub"):
        push_folder(folder, "me/model")
    assert hub.calls[1][2]["files"] == {**exported, "extra/notes.txt": b"kept: the user's own file"}
    assert caplog.records[-1].getMessage() == (
        f"Not pushed from {folder}: hidden entries (.refilled-hf.lock, extra/.ipynb_checkpoints); the outputs of the "
        "refilled-hf run written there (results.json, run.json, stage2)."
    )


def test_push_uploads_a_card_that_names_the_repo(hub, tmp_path):
    """A run without --hub_model_id renders its card for the folder (local-dir:<this folder>);
    pushed, the card on the Hub names the repo in its title, model-index and usage, and the
    folder's own card is unchanged. Pushed on to another repo, it names that one."""
    text = render_model_card(_fake_results(), RefilledConfig(output_dir="o").to_recipe(), architecture="resnet18")
    folder = export_model(timm.create_model("resnet18", num_classes=2), tmp_path / "m", label_names=["a", "b"],
                          extra_files={"README.md": text})  # fmt: skip
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    push_folder(folder, "me/model")
    sent = hub.calls[-1][2]["files"]
    assert {p: b for p, b in sent.items() if p != "README.md"} == {p: b for p, b in before.items() if p != "README.md"}
    card = ModelCard(sent["README.md"].decode())
    assert card.data.model_name == "me/model" and card.text.lstrip().startswith("# me/model\n")
    assert 'timm.create_model("hf-hub:me/model", pretrained=True)' in card.text
    assert 'from_pretrained("me/model")' in card.text and "--model hf-hub:me/model --dataset" in card.text
    assert "<this folder>" not in card.text and "refilled-hf student" not in str(card)
    # everything else is the card as written, metadata included
    assert card.data.eval_results == ModelCard(text).data.eval_results and card.data.tags == ModelCard(text).data.tags
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert card_for_repo(str(card), "you/copy").replace("you/copy", "me/model") == str(card)
    assert card_for_repo(str(card), "me/model") == str(card)
    # a card refilled-hf did not write is uploaded as it is
    for other in ("---\n[1, 2]\n---\n# x\n", "---\nkey: [unclosed\n---\n# x\n", "# x\n"):
        assert card_for_repo(other, "me/model") == other
    assert card_for_repo("---\nlicense: mit\n---\n# My model\n\nWeights.\n", "me/model").endswith(
        "# My model\n\nWeights.\n"
    )


def test_push_refuses_a_folder_that_is_not_a_complete_export(hub, tmp_path):
    folder = export_model(
        timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "model", label_names=["a", "b"]
    )
    with pytest.raises(HubPushError, match=r"no config.json\): nothing to push. It is a run folder: push its export"):
        push_folder(tmp_path, "me/model")  # the run folder, not its model/
    (folder / "model.safetensors").unlink()
    with pytest.raises(HubPushError, match="no weights"):
        push_folder(folder, "me/model")
    assert hub.calls == []


def test_offline_push_fails_clearly_and_keeps_the_folder(tmp_path):
    folder = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "m", label_names=["a", "b"])
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(HubPushError, match="local folder is complete") as info:
        push_folder(folder, "me/model", token="hf_TOKEN_VALUE")
    assert "hf_TOKEN_VALUE" not in str(info.value)
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before


def test_error_text_is_one_line_and_never_shows_a_token():
    from refilled_hf.messages import error_text

    token = "hf_" + "x" * 40
    err = RuntimeError(f"401 Client Error for url: https://huggingface.co/api (token {token})\n\nInvalid credentials")
    text = error_text(err, limit=66, redact=token)  # the cut falls where the token would be
    assert "\n" not in text and text.startswith("RuntimeError: 401 Client Error") and text.endswith("...")
    assert "hf_" not in text and len(text) == len("RuntimeError: ") + 66  # a cut token would leave its prefix
    assert error_text(ValueError("a\n  b  c")) == "ValueError: a" and error_text(KeyError()) == "KeyError"
    assert "<token>" in error_text(RuntimeError(f"bad {token}"), redact=token)


# ----------------------------------------------------------------- RefilledTrainer used from Python


def _trainer(tmp_path, stage: str, **config):
    from refilled_hf.backbone import FrozenTeacher, StudentModel
    from refilled_hf.trainer import RefilledTrainer

    images = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 3} for i in range(16)]
    args = RefilledConfig(output_dir=str(tmp_path / "run"), stage1_epochs=1, stage2_epochs=1, use_cpu=True,
                          per_device_train_batch_size=8, eval_strategy="no", disable_tqdm=True, **config)  # fmt: skip
    teacher = FrozenTeacher(timm.create_model("cifar_wrn_16_1", num_classes=5))
    student = timm.create_model("cifar_wrn_16_1", num_classes=3)
    trainer = RefilledTrainer(model=StudentModel(student), args=args, stage=stage, num_classes=3, teacher=teacher,
                              train_dataset=images, centers_dataset=images if stage == "stage1" else None,
                              class_names=["cat", "dog", "owl"])  # fmt: skip
    return trainer, student


def _same_logits(folder: Path, student) -> bool:
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        return torch.equal(loaded(x), student.eval()(x))


def test_the_trainer_pushes_the_student_in_timms_layout_after_training_never_a_checkpoint(hub, tmp_path):
    trainer, student = _trainer(tmp_path, "stage2", push_to_hub=True, hub_model_id="me/student",
                                hub_private_repo=True, hub_token="hf_SECRET_TOKEN")  # fmt: skip
    trainer.compute_teacher_centers(trainer.train_dataset)
    trainer.train()
    # the login is checked before training; one commit after it, of the timm export and its card
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "create_commit"]
    assert hub.calls[1][1] == "me/student" and hub.calls[1][2]["private"] is True
    assert hub.calls[2][2]["token"] == "hf_SECRET_TOKEN"
    files = hub.calls[2][2]["files"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, content in files.items():
        (pushed / name).write_bytes(content)
    assert json.loads(files["config.json"])["label_names"] == ["cat", "dog", "owl"]
    assert _same_logits(pushed, student)
    card = ModelCard(files["README.md"].decode())
    assert card.data.model_name == "me/student" and 'timm.create_model("hf-hub:me/student"' in card.text
    assert "stage 2" in card.text and "knowledge-distillation" in card.data.tags
    # the checkpoints stay in the stage's folder, without the token
    checkpoints = list((tmp_path / "run" / "stage2").glob("checkpoint-*"))
    assert checkpoints and all(b"hf_SECRET_TOKEN" not in p.read_bytes() for c in checkpoints for p in c.iterdir())


def test_the_trainer_saves_the_student_in_timms_layout_and_never_over_other_files(tmp_path):
    trainer, student = _trainer(tmp_path, "ce")
    trainer.train()
    trainer.save_model()
    export = tmp_path / "run" / "ce" / "model"
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert _same_logits(export, student)
    card = (export / "README.md").read_text()
    assert "cross-entropy" in card and 'timm.create_model("local-dir:<this folder>"' in card
    pushed = ModelCard(card_for_repo(card, "me/later"))  # `refilled-hf push` of this folder
    assert pushed.data.model_name == "me/later" and 'timm.create_model("hf-hub:me/later"' in pushed.text
    assert 'from_pretrained("me/later")' in pushed.text and "<this folder>" not in pushed.text
    trainer.save_model(str(export))  # over an earlier export: replaced
    assert _same_logits(export, student)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"holds files an export does not write \(notes.txt\)"):
        trainer.save_model(str(mine))
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1


def test_stage_one_neither_saves_nor_pushes_its_untrained_head(hub, tmp_path):
    trainer, _ = _trainer(tmp_path, "stage1", push_to_hub=True, hub_model_id="me/student")
    trainer.train()
    assert hub.calls == []  # the stage-2 trainer pushes
    with pytest.raises(ValueError, match="classifier is untrained"):
        trainer.save_model()
    with pytest.raises(ValueError, match="needs hub_model_id"):
        _trainer(tmp_path, "ce", push_to_hub=True)
    with pytest.raises(ValueError, match="class_names names 2 classes"):
        from refilled_hf.backbone import StudentModel
        from refilled_hf.trainer import RefilledTrainer

        RefilledTrainer(model=StudentModel(timm.create_model("cifar_wrn_16_1", num_classes=3)), args=trainer.args,
                        stage="ce", num_classes=3, class_names=["a", "b"])  # fmt: skip


@pytest.mark.parametrize("proc_readable", [True, False])
def test_safetensors_files_get_the_mode_the_umask_gives_any_new_file(tmp_path, monkeypatch, proc_readable):
    """safetensors creates its files 0o600 whatever the umask; refilled-hf's are readable
    as a plain open() would make them, whether /proc states the umask or not."""
    import os
    import stat

    from refilled_hf import hub

    if not proc_readable:
        real_read_text = Path.read_text

        def no_proc(self, *args, **kwargs):
            if str(self).startswith("/proc/"):
                raise OSError("no /proc here")
            return real_read_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", no_proc)
    old = os.umask(0o027)
    try:
        hub.save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        (tmp_path / "plain.txt").write_text("x")
        assert os.umask(0o027) == 0o027  # the umask is as it was
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"w.safetensors": 0o640, "plain.txt": 0o640}
