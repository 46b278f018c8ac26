"""Any timm model as an embedder, how models are loaded, and the frozen teacher.

REFILLED works on the pooled pre-logits embedding of a timm model:
``model.forward_head(model.forward_features(x), pre_logits=True)``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .messages import error_text, offline_hint, unreadable_file_text

__all__ = [
    "FrozenTeacher",
    "ModelLoadError",
    "StudentModel",
    "embed",
    "embed_and_logits",
    "exported_config",
    "load_timm_model",
    "read_state_dict",
    "setup_fingerprint",
    "use_channels_last",
    "weights_origin",
]


logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model spec or checkpoint that cannot be turned into a model (the message says why)."""


def _check_timm_interface(model: nn.Module) -> None:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(
            f"{type(model).__name__} has no `forward_features`/`forward_head`: pass a timm model "
            "(timm.create_model(...)), whose pooled pre-logits embedding REFILLED uses."
        )


def _flatten(x: torch.Tensor) -> torch.Tensor:
    # Models built with global_pool="" return unpooled maps from forward_head(pre_logits=True).
    return x.flatten(1) if x.dim() > 2 else x


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits embedding ``[B, num_features]`` of any timm model:
    ``model.forward_head(model.forward_features(x), pre_logits=True)``."""
    _check_timm_interface(model)
    return _flatten(model.forward_head(model.forward_features(images), pre_logits=True))


def embed_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding and logits from one pass through the trunk (the head runs twice; it is
    cheap, and running it twice is correct for every timm head, including those with a
    norm or dropout before the classifier)."""
    _check_timm_interface(model)
    features = model.forward_features(images)
    return _flatten(model.forward_head(features, pre_logits=True)), model.forward_head(features)


# --------------------------------------------------------------------------- loading


def _contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: this module's own parameters and buffers in the default layout."""
    for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        key = prefix + name
        if key in state_dict:
            state_dict[key] = state_dict[key].contiguous()


def use_channels_last(model: nn.Module) -> nn.Module:
    """Put ``model``'s 4-d weights in channels-last (NHWC) memory format, in place: convolutions
    then also produce channels-last activations (the layout GPU tensor cores prefer).

    Every ``state_dict()`` of the model or of any of its submodules still holds tensors in
    the default layout (safetensors refuses strided tensors), so checkpoints, stage hand-offs
    and the export are unchanged. Idempotent."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.dim() == 4 for t in own) and not getattr(module, "_refilled_contiguous_state", False):
            module.register_state_dict_post_hook(_contiguous_state)
            module._refilled_contiguous_state = True
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from ``.safetensors`` or, for legacy files, ``.pt/.pth/.bin`` with
    ``torch.load(weights_only=True)`` (never unpickles arbitrary objects)."""
    path = Path(path)
    if path.is_dir():
        export = path if (path / "config.json").is_file() else _run_export(path) or path
        weights = path / "model.safetensors"
        if weights.is_file() and not (path / "config.json").is_file():  # a stage's checkpoint-N folder
            fix = f"pass its weights file, {weights}"
        else:
            fix = (f"an exported model folder (config.json + model.safetensors) is a model of its own: pass it as "
                   f"'local-dir:{export}', with no checkpoint")  # fmt: skip
        raise ModelLoadError(
            f"Checkpoint {str(path)!r} is a folder; a checkpoint is one weights file (.safetensors, .pth, .bin): {fix}."
        )
    if not path.is_file():
        raise ModelLoadError(f"Checkpoint file {str(path)!r} does not exist: check the path.")
    unreadable = unreadable_file_text(path)
    if unreadable:
        raise ModelLoadError(f"Checkpoint {unreadable}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file
        raise ModelLoadError(
            f"Checkpoint {str(path)!r} could not be read ({error_text(err)}). Pass a "
            ".safetensors file, or a .pt/.pth state dict loadable with torch.load(weights_only=True)."
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"Checkpoint {str(path)!r} does not hold a state dict of tensors.")
    return state


def _classifier_name(model: nn.Module) -> str | None:
    """The module name of ``model``'s one classifier, as its pretrained_cfg names it (None
    where it names none, or several)."""
    name = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    return name if isinstance(name, str) else None


def _classifier_outputs(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Number of classes of a checkpoint, read from the weight of the model's classifier."""
    name = _classifier_name(model)
    weight = state.get(f"{name}.weight") if name is not None else None
    return int(weight.shape[0]) if weight is not None else None


def _headless(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Whether a checkpoint lacks the classifier that ``model`` has (one classifier, named by its pretrained_cfg)."""
    name = _classifier_name(model)
    if name is None or f"{name}.weight" not in model.state_dict():
        return False
    return not any(key == name or key.startswith(f"{name}.") for key in state)


def _close_model_names(name: str) -> list[str]:
    """Registered timm model names close to ``name`` (for a "did you mean")."""
    return difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)


def _check_readable(spec: str, folder: Path) -> None:
    """Refuse a model folder whose config or weights this user cannot read (they would be
    reported as missing or damaged)."""
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        unreadable = unreadable_file_text(folder / name)
        if unreadable:
            raise ModelLoadError(f"{spec!r}: {unreadable}.")


def _foreign_model_error(spec: str, config: dict[str, Any]) -> ModelLoadError | None:
    """The error for a folder whose ``config.json`` is a transformers model's (no timm
    ``architecture``), or None."""
    if config.get("architecture") or not (config.get("architectures") or config.get("model_type")):
        return None
    kind = ", ".join(config.get("architectures") or []) or config["model_type"]
    return ModelLoadError(
        f"{spec!r} holds a transformers model ({kind}), not a timm one: refilled-hf trains and distils timm models "
        "(their forward_features / forward_head). Use the timm version of that model (many are on the Hub as "
        "hf-hub:timm/<name>), or a timm model fine-tuned on the same data."
    )


def _run_export(folder: Path) -> Path | None:
    """The exported model in ``folder`` where it is a run's ``output_dir`` (``model/`` with a
    ``config.json``), else None."""
    export = folder / "model"
    return export if (export / "config.json").is_file() else None


def _unknown_model_error(name: str) -> ModelLoadError:
    path = Path(name).expanduser()
    if path.is_dir():
        foreign = _foreign_model_error(name, exported_config(f"local-dir:{name}") or {})
        if foreign is not None:
            return foreign
        export = None if (path / "config.json").is_file() else _run_export(path)
        if export is not None:  # a run's output_dir: its model is the export in it
            text = f"{name!r} is a run folder, not a timm model name: its model is 'local-dir:{export}'."
            return ModelLoadError(text)
        return ModelLoadError(
            f"{name!r} is a folder, not a timm model name: pass it as 'local-dir:{name}' (a folder in timm's Hub "
            "format, config.json + model.safetensors, such as refilled-hf's exports)."
        )
    if path.is_file():
        return ModelLoadError(
            f"{name!r} is a file, not a timm model name: give the model's timm name, and the file as its "
            "checkpoint (--teacher_checkpoint / --student_checkpoint)."
        )
    close = _close_model_names(name)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ModelLoadError(
        f"Unknown timm model {name!r}.{hint} Use a name from timm.list_models(), a 'local-dir:<folder>' "
        "or an 'hf-hub:<repo id>'; refilled-hf's own models (cifar_wrn_*) need `import refilled_hf`."
    )


def exported_config(spec: str | None) -> dict[str, Any] | None:
    """The ``config.json`` of a ``local-dir:`` or ``hf-hub:`` model (an ``hf-hub:`` one from
    the Hub cache, which loading the model fills). None for a registered timm name, a folder
    without one, or (with a warning) an ``hf-hub:`` file that cannot be fetched."""
    if spec and spec.startswith("local-dir:"):
        path = Path(spec[len("local-dir:") :]) / "config.json"
        if not path.is_file():
            return None
        _check_readable(spec, path.parent)
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelLoadError(
                f"{spec!r}: its config.json is not valid JSON ({error_text(err)}). The folder is damaged or "
                "incomplete: export or copy it again (config.json + model.safetensors)."
            ) from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{spec!r}: its config.json holds no timm model configuration (a JSON object).")
        return config
    if spec and spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = spec[len("hf-hub:") :].partition("@")
        try:
            return json.loads(Path(hf_hub_download(repo, "config.json", revision=revision or None)).read_text())
        except Exception as err:  # noqa: BLE001 - network, auth and format errors alike
            logger.warning("Could not read config.json of %s (%s).", spec, err)
    return None


def load_timm_model(
    spec: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model from a spec.

    Args:
        spec: a registered timm name, ``local-dir:<folder>`` (a timm Hub-format folder with
            ``config.json`` and ``model.safetensors``, e.g. one written by refilled-hf) or
            ``hf-hub:<repo id>``.
        num_classes: classifier size; ``None`` keeps the one of the checkpoint or folder.
        checkpoint: weights for a registered name (``.safetensors``, or a legacy ``.pt``
            read with ``weights_only=True``). Its classifier size is used when
            ``num_classes`` is ``None``.
        pretrained: for a registered name without checkpoint, load timm's pretrained
            weights (needs the Hub).
        image_size: the input size it will run at: a model whose input size is fixed
            (``fixed_input_size`` in its ``pretrained_cfg``: ViTs, MLP-Mixers, ...) is built
            for it, as timm does with ``img_size`` (loaded position embeddings resampled);
            other models take any size as they are.
        kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).
    """

    def build(resize: dict[str, Any]) -> nn.Module:
        try:
            return _load_timm_model(spec, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained,
                                    **resize, **kwargs)  # fmt: skip
        except ModelLoadError:
            raise
        except Exception as err:  # noqa: BLE001 - each architecture fails in its own way at a size it cannot take
            if not resize:
                raise
            raise ModelLoadError(
                f"{spec!r} takes a fixed input size, and timm cannot build it for {image_size} px inputs "
                f"({error_text(err, limit=200)}): choose an input size its patches (and windows) divide."
            ) from err

    hub = spec.startswith("hf-hub:")
    model = build({} if hub or not image_size else _input_size_kwargs(_registered_or_exported_cfg(spec), image_size))
    if hub:  # its config is known once fetched: built again for the size, from the cache
        resize = _input_size_kwargs(getattr(model, "pretrained_cfg", None) or {}, image_size)
        if resize:
            model = build(resize)
    return model


def weights_origin(spec: str, checkpoint: str | Path | None, pretrained: bool) -> str | None:
    """Where the weights :func:`load_timm_model` gave ``spec`` come from, in words for a
    model card: ``the weights of `<file>` ``, ``timm's pretrained weights `<hub id>` ``,
    ``random initialization``; None for a ``local-dir:`` or ``hf-hub:`` model (its name
    says where its weights lie)."""
    if spec.startswith(("local-dir:", "hf-hub:")):
        return None
    if checkpoint is not None:
        return f"the weights of `{checkpoint}`"
    if not pretrained:
        return "random initialization"
    cfg = timm.models.get_pretrained_cfg(spec)
    where = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
    return f"timm's pretrained weights `{where}`" if where else "timm's pretrained weights"


def _registered_or_exported_cfg(spec: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a registered timm name or a ``local-dir:`` folder, read
    without building the model ({} where there is none)."""
    if spec.startswith("local-dir:"):
        return (exported_config(spec) or {}).get("pretrained_cfg") or {}
    cfg = timm.models.get_pretrained_cfg(spec) if timm.is_model(spec) else None
    return cfg.to_dict() if cfg is not None else {}


def _input_size_kwargs(pretrained_cfg: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """``img_size`` for a model of fixed input size (its pretrained_cfg says so) built for another size."""
    size = (pretrained_cfg.get("input_size") or (None,))[-1]
    if image_size and pretrained_cfg.get("fixed_input_size") and size != image_size:
        return {"img_size": image_size}
    return {}


def _load_timm_model(
    spec: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    if checkpoint is not None and spec.startswith(("local-dir:", "hf-hub:")):
        raise ModelLoadError(
            f"A checkpoint ({checkpoint}) was given for {spec!r}, which brings its own weights: give a registered "
            "model name with the checkpoint, or the folder alone."
        )
    if spec.startswith("local-dir:"):
        config = exported_config(spec)
        if config is None:
            folder = spec[len("local-dir:") :]
            export = _run_export(Path(folder).expanduser())
            hint = f" It is a run folder: its model is 'local-dir:{export}'." if export is not None else ""
            raise ModelLoadError(
                f"{spec!r}: no config.json in {folder!r}. A local-dir: model is a folder in timm's Hub format "
                f"(config.json + model.safetensors), e.g. one written by `refilled-hf train-teacher`.{hint}"
            )
        architecture = config.get("architecture", "")
        foreign = _foreign_model_error(spec, config)
        if foreign is not None:
            raise foreign
        if architecture and not timm.is_model(architecture):
            close = _close_model_names(architecture)
            raise ModelLoadError(
                f"{spec!r}: its config.json names the architecture {architecture!r}, which timm does not know"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + ". It was exported by a timm that has it, or by a library that registers it with timm when imported "
                "(`import refilled_hf` registers its cifar_wrn_*): upgrade timm, or export the model again."
            )
        extra = {} if num_classes is None else {"num_classes": num_classes}
        try:
            return timm.create_model(spec, pretrained=True, **extra, **kwargs)
        except Exception as err:  # noqa: BLE001 - a missing, truncated or foreign weights file
            raise ModelLoadError(
                f"{spec!r}: its weights could not be loaded ({error_text(err)}). The folder "
                "is damaged or incomplete: export or copy it again (config.json + model.safetensors)."
            ) from err
    if spec.startswith("hf-hub:"):
        extra = {} if num_classes is None else {"num_classes": num_classes}
        try:
            return timm.create_model(spec, pretrained=True, **extra, **kwargs)
        except Exception as err:  # noqa: BLE001 - network, auth and format errors alike
            raise ModelLoadError(
                f"Could not load {spec!r} from the Hugging Face Hub ({error_text(err)}). Check the "
                f"repo id and your network, or download it and use 'local-dir:<folder>'.{offline_hint(err)}"
            ) from err
    if not timm.is_model(spec):
        raise _unknown_model_error(spec)
    if checkpoint is None:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(spec, pretrained=pretrained, **extra, **kwargs)
    state = read_state_dict(checkpoint)
    probe = timm.create_model(spec, pretrained=False, **kwargs)
    state = _without_wrapper_prefix(state, set(probe.state_dict()))
    if num_classes is None:
        num_classes = _classifier_outputs(state, probe)
    if num_classes is None and _headless(state, probe):  # a backbone's weights (self-supervised, an embedding model)
        logger.info("%s holds no classifier weights: %s is built without a classifier (its embedding).",
                    checkpoint, spec)  # fmt: skip
        num_classes = 0
    num_classes = probe.num_classes if num_classes is None else num_classes
    try:
        return _load_filtered(spec, state, num_classes, kwargs)
    except Exception as err:  # noqa: BLE001 - a strict load's RuntimeError, or a filter that met another format
        model = probe if num_classes == probe.num_classes else timm.create_model(spec, num_classes=num_classes,
                                                                                 **kwargs)  # fmt: skip
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape
                          and not ("img_size" in kwargs and _resampled_for_size(k)))  # fmt: skip
        detail = [f"{len(keys)} {what} ({_some(keys)})" for what, keys in
                  (("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", reshaped))
                  if keys]  # fmt: skip
        if not detail:
            detail = [error_text(err, limit=300)]
        size = kwargs.get("img_size")
        raise ModelLoadError(
            f"Checkpoint {str(checkpoint)!r} does not match the architecture {spec!r}: {'; '.join(detail)}. Check "
            "the model name (and its variant) the checkpoint was trained with"
            + (f", and the input size it was built for here ({size} px): the size it was trained at." if size else ".")
        ) from None


def _resampled_for_size(key: str) -> bool:
    """Whether timm's checkpoint filters resample this weight to a model's input size (its
    shape then differs from the checkpoint's by design)."""
    return any(part in key for part in ("pos_embed", "relative_position", "attn_mask"))


def _load_filtered(spec: str, state: dict[str, torch.Tensor], num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The registered model ``spec`` (built with ``kwargs``) with the weights ``state``,
    loaded as timm loads pretrained weights: through the architecture's own checkpoint
    filter, which adapts what its layout allows (a ViT built for another ``img_size``: its
    position embeddings resampled to the new grid; a Swin's relative position tables; the
    original-format checkpoints timm converts, such as DINOv2's with its ``mask_token``),
    then strictly: anything else that differs is an error. timm-format weights pass the
    filters unchanged."""
    # the same classes as the weights: the classifier is kept as it is (no label offset)
    overlay = {"state_dict": state, "num_classes": num_classes, "label_offset": 0}
    model = timm.create_model(spec, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                              **kwargs)  # fmt: skip
    model.pretrained_cfg.pop("state_dict", None)  # the weights are the model's now, not its configuration's
    if isinstance(getattr(model, "default_cfg", None), dict):
        model.default_cfg.pop("state_dict", None)
    return model


#: prefixes that wrappers put before a model's own parameter names: refilled-hf's
#: StudentModel (its Trainer checkpoints), DDP's ``module.``, and both
WRAPPER_PREFIXES = ("module.model.", "model.", "module.")


def _without_wrapper_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with a wrapper's prefix removed, where every key has it and none of the
    model's own names appear without it (a Trainer checkpoint of a stage, a DDP state)."""
    if not state or set(state) & expected:
        return state
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _some(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# --------------------------------------------------------------------------- models


def setup_fingerprint(model: nn.Module, spec: str, **inputs: Any) -> str:
    """SHA-256 of what ``model`` (loaded from ``spec``) computes with besides its weights: its
    class, the arguments a ``local-dir:`` folder's config.json builds it with (``model_args``),
    and ``inputs`` (how its inputs are prepared). Two folders that hold the same weights and the
    same setup hold the same model, wherever they lie."""
    config = exported_config(spec) if spec.startswith("local-dir:") else None
    record = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_args": (config or {}).get("model_args"),
        **inputs,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class _SeededOpWatch(TorchDispatchMode):
    """Notes whether an op that draws from a random generator ran (PyTorch tags every such
    op ``nondeterministic_seeded``: dropout's bernoulli, rand, randperm, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen = self.seen or torch.Tag.nondeterministic_seeded in func.tags
        return func(*args, **(kwargs or {}))


class StudentModel(nn.Module):
    """The student as the Trainer sees it: a timm model whose forward returns its pooled
    embedding and logits, so that DDP and autocast wrap one call.

    ``embeddings_only=True`` (stage 1) skips the classifier, whose parameters are then
    frozen so that the optimizer, weight decay and DDP leave them untouched (every one of
    them: distilled models such as DeiT's and LeViT's return two, ``(head, head_dist)``).
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int] | None = None):
        super().__init__()
        _check_timm_interface(model)
        self.model = model
        self.embeddings_only = False
        #: ``(C, H, W)`` of the images it trains on (default: its ``pretrained_cfg``'s)
        self.input_size = tuple(input_size or (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or ())

    def set_embeddings_only(self, value: bool) -> None:
        self.embeddings_only = value
        classifier = self.model.get_classifier()
        for head in classifier if isinstance(classifier, (tuple, list)) else (classifier,):
            if isinstance(head, nn.Module):
                for p in head.parameters():
                    p.requires_grad_(not value)

    def parameters_without_gradient(self) -> list[str] | None:
        """The trainable parameters that the outputs of one forward pass (in training mode,
        on images of :attr:`input_size`) do not depend on, by name; ``None`` when that
        cannot be told (no input size known, or the pass failed).

        The pass runs on the meta device, on stand-ins of the parameters and buffers: it
        computes nothing, and changes no weight, running statistic or random state. DDP
        must look for such parameters at every step (``find_unused_parameters``) when there
        are any, and only then."""
        if len(self.input_size) != 3:
            return None
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        stand_ins = self._meta_stand_ins(trainable)
        try:
            outputs = self._meta_training_forward(stand_ins)
            total = sum(output.float().sum() for output in outputs.values())
            names = sorted(trainable)
            grads = torch.autograd.grad(total, [stand_ins[n] for n in names], allow_unused=True)
        except Exception:  # noqa: BLE001 (any failure: unknown, so DDP keeps looking)
            return None
        return [name for name, grad in zip(names, grads) if grad is None]

    def draws_random_numbers_in_training(self) -> bool | None:
        """Whether a forward pass of the whole model in training mode draws random numbers
        (dropout, drop path: any op PyTorch tags as seeded), from one pass on the meta device
        as :meth:`parameters_without_gradient` makes it; ``None`` when that cannot be told."""
        if len(self.input_size) != 3:
            return None
        embeddings_only, self.embeddings_only = self.embeddings_only, False  # the head's dropout too
        try:
            with _SeededOpWatch() as watch:
                self._meta_training_forward(self._meta_stand_ins(set()))
        except Exception:  # noqa: BLE001 (any failure: unknown)
            return None
        finally:
            self.embeddings_only = embeddings_only
        return watch.seen

    def _meta_stand_ins(self, trainable: set[str]) -> dict[str, torch.Tensor]:
        """Meta-device stand-ins of the parameters and buffers, by name; those in ``trainable`` require gradients."""
        return {
            name: torch.empty_like(t, device="meta").requires_grad_(name in trainable)
            for name, t in [*self.named_parameters(), *self.named_buffers()]
        }

    def _meta_training_forward(self, stand_ins: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs of one forward pass in training mode on two meta images of
        :attr:`input_size` (batch norm needs more than one value), with ``stand_ins`` for the
        parameters and buffers; every module's mode is restored as it was."""
        images = torch.empty(2, *self.input_size, device="meta")
        modes = {module: module.training for module in self.modules()}
        try:
            self.train()
            with torch.compiler.set_stance("force_eager"):  # a compiled student: no compile for this pass
                return torch.func.functional_call(self, stand_ins, (), {"pixel_values": images})
        finally:
            for module, training in modes.items():
                module.training = training

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.embeddings_only:
            return {"embeddings": embed(self.model, pixel_values)}
        emb, logits = embed_and_logits(self.model, pixel_values)
        return {"embeddings": emb, "logits": logits}


class FrozenTeacher(nn.Module):
    """A frozen timm teacher: eval mode whatever ``train()`` asks, no gradients, and its
    input adapted from the student's preprocessing.

    When the two models' ``pretrained_cfg`` differ in mean/std or input size (say an
    ImageNet model at 224 px teaching a CIFAR student at 32 px), each batch, normalized
    for the student, is re-normalized for the teacher and resized to its input size.
    """

    def __init__(
        self,
        model: nn.Module,
        student_cfg: dict[str, Any] | None = None,
        input_size: int | None = None,
    ):
        super().__init__()
        _check_timm_interface(model)
        self.model = model.eval().requires_grad_(False)
        teacher_cfg = getattr(model, "pretrained_cfg", {}) or {}
        student_cfg = student_cfg or teacher_cfg
        s_mean, s_std = _stats(student_cfg)
        t_mean, t_std = _stats(teacher_cfg)
        self.renormalize = not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std = x * scale + shift
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        size = input_size or teacher_cfg.get("input_size", (3, None, None))[-1]
        student_size = student_cfg.get("input_size", (3, None, None))[-1]
        self.input_size = int(size) if size and size != student_size else None
        self.student_size = int(student_size) if student_size else None
        self.interpolation = "bicubic" if teacher_cfg.get("interpolation") == "bicubic" else "bilinear"

    @property
    def architecture(self) -> str:
        """The teacher's timm architecture (``resnet18``), as its ``pretrained_cfg`` names it."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return str(cfg.get("architecture") or type(self.model).__name__)

    def adaptation_text(self) -> str:
        """How each student batch is adapted for the teacher, in words (for the run's log)."""
        steps = []
        if self.renormalize:
            steps.append("re-normalized from the student's mean/std to the teacher's")
        if self.input_size is not None:
            steps.append(f"resized from {self.student_size or '?'} to {self.input_size} px ({self.interpolation})")
        if not steps:
            return "the student's batches as they are (same normalization and input size)"
        return "each student batch " + " and ".join(steps)

    def input_setup(self) -> dict[str, Any]:
        """How each student batch is adapted for the teacher, in numbers (for fingerprints)."""
        return {
            "renormalize": self.renormalize,
            "scale": self.scale.flatten().tolist(),
            "shift": self.shift.flatten().tolist(),
            "input_size": self.input_size,
            "interpolation": self.interpolation,
        }

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalized images -> the teacher's normalization and input size."""
        if self.renormalize:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if self.input_size is not None:
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode=self.interpolation, align_corners=False
            )
        return images

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding, logits)`` of the teacher for student-preprocessed ``images``.

        Runs in inference mode: unlike ``no_grad``, no version counters or view tracking
        for any of the teacher's ops. The outputs are inference tensors, which the losses
        only read (they cannot be modified in place, nor saved for a backward pass)."""
        return embed_and_logits(self.model, self.adapt(images))


def _stats(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    mean = cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)
    std = cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
