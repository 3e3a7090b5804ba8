"""The three recipes: which model trains, which of its parameters, and in which configuration.

| recipe            | model                                               | trainable                  | configuration / step |
|-------------------|-----------------------------------------------------|----------------------------|----------------------|
| `full`            | the family's stock model                             | everything (+ aux head)    | —                    |
| `visor-stage1`    | its VISOR model, `from_stock(--init)`                | CA blocks, gates, CPE      | the largest          |
| `visor-universal` | a VISOR checkpoint (stage 1) or a converted LLaVA-OV | everything                 | one sampled per step |

`full` (from scratch with `--model PRESET`, or continued with `--init`) adds the auxiliary per-patch loss when the
data has per-patch targets (a fresh head when continuing): a
linear head on the vision tower's selected features predicts each patch's content class, the training-only
stand-in for a pretrained vision encoder that makes the fine-grained tasks learnable on a CPU budget
(src/visor/demo/checkpoint/TRAINING.md). The head is saved with the training state, never with the model.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import torch
from torch import nn

from visor import presets
from visor.backbones import backbone_for, family
from visor.backbones.base import IMAGE_ARGUMENTS
from visor.modeling import VisorModel, load_stock
from visor.modeling.visor import check_checkpoint_folder
from visor.modeling.freezing import freeze_base, unfreeze_all

RECIPES = ("full", "visor-stage1", "visor-universal")
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", *IMAGE_ARGUMENTS)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def is_visor(model) -> bool:
    return isinstance(model, VisorModel)


# ---- loading -------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, attn_implementation: str = "sdpa"):
    """A stock or VISOR model from a local folder, in fp32, with clear errors for bad checkpoints."""
    options = dict(attn_implementation=attn_implementation, dtype=torch.float32)
    module, holds_visor = checkpoint_family(path)
    if holds_visor:
        return module.VISOR_MODEL.from_pretrained(path, **options)  # local folders: ValueError when broken
    return load_stock(module.BACKBONE.stock_model_class, path, **options)


def checkpoint_family(path: str | os.PathLike):
    """(the `visor.backbones` module of a local checkpoint folder's family, whether it holds a VISOR model)."""
    config = SimpleNamespace(**check_checkpoint_folder(path))
    try:
        module = family(config)
    except ValueError as error:
        raise ValueError(f"checkpoint {path}: {error}") from None
    return module, config.model_type.startswith("visor")


def build_model(recipe: str, init: str | os.PathLike | None, preset: str | None, settings):
    """The model a recipe starts from, with the right parameters trainable."""
    check_recipe(recipe)
    if (init is None) == (preset is None):
        raise ValueError("give exactly one of --init PATH (a checkpoint) or --model PRESET (from scratch)")
    if recipe == "full":
        if init is not None:
            model = load_checkpoint(init, settings.attn_implementation)
            if is_visor(model):
                raise ValueError(f"--init {init} is a VISOR checkpoint; recipe 'full' trains the stock model")
        else:
            if preset not in presets.PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(presets.PRESETS))}")
            builder = presets.PRESETS[preset]
            if settings.model_layers is None:
                config = builder()
            elif "num_layers" in inspect.signature(builder).parameters:
                config = builder(num_layers=settings.model_layers)
            else:
                raise ValueError(f"preset {preset!r} has a fixed depth: model_layers cannot be set")
            config._attn_implementation = settings.attn_implementation
            torch.manual_seed(settings.seed)
            backbone = backbone_for(config)
            model = backbone.stock_model_class(config)
            if hasattr(backbone.vision_tower(model), "embeddings"):  # SigLIP's, InternViT's learned positions
                init_patch_positions_2d(backbone.vision_tower(model))
            if settings.embedding_std is not None:
                with torch.no_grad():
                    model.get_input_embeddings().weight.normal_(0.0, settings.embedding_std)
        return _trainable(unfreeze_all(model.train()), settings)
    if init is None:
        raise ValueError(f"recipe {recipe!r} starts from a checkpoint: pass --init PATH (a full model or a VISOR model)")
    model = load_checkpoint(init, settings.attn_implementation)
    shape = {name: getattr(settings, name) for name in (
        "cross_attention_layers", "self_attention_layers", "cross_attention_key_value_heads",
    ) if getattr(settings, name) is not None}
    if not is_visor(model):
        torch.manual_seed(settings.seed)
        model = family(model.config).VISOR_MODEL.from_stock(
            model, cross_attention_init=settings.cross_attention_init, cross_attention_gate=settings.cross_attention_gate,
            **shape,
        )
    else:  # already converted (or resuming): the settings may only restate its shape
        built = dict(cross_attention_layers=model.config.cross_attention_layers,
                     self_attention_layers=model.config.self_attention_layers,
                     cross_attention_key_value_heads=model.config.cross_attention_key_value_heads
                     or model.config.text_config.num_key_value_heads)
        wanted = dict(shape)
        if "cross_attention_layers" in wanted:
            wanted["cross_attention_layers"] = sorted(wanted["cross_attention_layers"])  # as VisorConfig keeps them
        differing = {name: (value, built[name]) for name, value in wanted.items() if value != built[name]}
        if differing:
            raise ValueError(f"--init {init} is a VISOR model whose shape differs from the settings "
                             f"(setting, model): {differing}; those settings apply when converting a full model")
    model.train()
    model.config.forget_router_training()  # the router was trained on the features of the weights this run changes
    return freeze_base(model) if recipe == "visor-stage1" else _trainable(unfreeze_all(model), settings)


def _trainable(model, settings):
    """Every parameter trainable, but for the vision tower when the settings keep it fixed (as LLaVA recipes keep a
    pretrained encoder), so that whatever a task needs beyond the tower's features is computed by the language
    model."""
    if settings.freeze_vision_tower:
        backbone_for(model.config).vision_tower(model).requires_grad_(False)
    return model


def check_configurations(model, recipe: str, settings) -> None:
    """Settings that refer to configurations must fit the model's config (before any training starts)."""
    if settings.pool_strides is not None:
        if recipe != "full":
            raise ValueError("pool_strides trains the stock model reading pooled images: recipe 'full' only")
        from visor.reduction.prellm import check_backbone

        check_backbone(model.config)
    if not is_visor(model):
        if settings.configuration_weights is not None and recipe != "full":
            raise ValueError("configuration_weights needs a VISOR model")
        return
    count = len(model.config.configurations)
    weights = settings.configuration_weights
    if weights is not None and len(weights) != count:
        raise ValueError(
            f"configuration_weights has {len(weights)} entries but the model has {count} configurations "
            f"{model.config.configurations}"
        )
    if settings.stage1_configuration is not None and not 0 <= settings.stage1_configuration < count:
        raise ValueError(f"stage1_configuration {settings.stage1_configuration} out of range 0..{count - 1}")


def configuration_for_step(recipe: str, model, settings, step: int) -> int | None:
    """The configuration a step trains: None for the stock model, fixed for stage 1, sampled for universal.

    The universal sample is a pure function of (seed, step), identical on every process, so resumed and
    multi-process runs draw the same sequence without any sampler state.
    """
    if not is_visor(model):
        return None
    if recipe == "visor-stage1":
        chosen = settings.stage1_configuration
        return model.config.largest_configuration if chosen is None else chosen
    count = len(model.config.configurations)
    return _drawn(settings.seed, step, settings.configuration_weights or [1.0] * count)


def pool_stride_for_step(settings, step: int) -> float | None:
    """The pooling stride a `full` step trains with (`pool_strides`), drawn like universal's configurations."""
    strides = settings.pool_strides
    return None if strides is None else strides[_drawn(settings.seed, step, [1.0] * len(strides))]


def _drawn(seed: int, step: int, weights: list[float]) -> int:
    """An index drawn with `weights`, a pure function of (seed, step): the same on every process and on resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator))


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) 2-D sine-cosine codes of a side x side patch grid, row-major (as in MAE / ViT).

    Half the channels code the row and half the column, each with dim/4 frequencies (sin and cos), spread
    geometrically from half a period over the grid to one period per two patches, so that neighbouring patches
    get clearly different codes (the usual 1/10000^k spacing wastes most channels on near-constant ones)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine codes need a width divisible by 4, got {dim}")
    count = dim // 4
    exponents = torch.arange(count, dtype=torch.float64) / max(count - 1, 1)
    frequencies = torch.pi / side * float(side) ** exponents
    grid = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    parts = []
    for axis in (rows, cols):
        angles = axis.reshape(-1, 1) * frequencies
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def init_patch_positions_2d(vision_tower) -> None:
    """Start a from-scratch SigLIP or InternViT tower's learned patch positions at 2-D sine-cosine codes (InternViT's
    CLS position stays as it was).

    A pretrained encoder hands the LLM patches that know where they are; random (or, InternViT's, zero) positions
    make every question about *where* (which cell, which bar) wait for the positions to be learned first. The codes
    stay trainable."""
    embeddings = vision_tower.embeddings
    if hasattr(embeddings, "position_embedding"):  # SigLIP: one embedding per patch
        weight = embeddings.position_embedding.weight
    else:  # InternViT: a (1, 1 + patches, d) parameter, the CLS token's position first
        weight = embeddings.position_embeddings[0, 1:]
    side = int(round(len(weight) ** 0.5))
    if side * side != len(weight):
        raise ValueError(f"patch positions do not form a square grid ({len(weight)})")
    weight.copy_(sincos_2d(side, weight.shape[1]))


# ---- the module that trains ------------------------------------------------------------------------------------
class PatchAuxiliaryHead(nn.Module):
    """Linear per-patch classifier on the vision tower's selected features (training only)."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """features (crops, patches, d), targets (crops, patches) with -100 = no target → mean cross-entropy."""
        logits = self.classifier(features).float()
        if not bool((targets != -100).any()):
            return logits.sum() * 0.0  # keeps the graph (and DDP's reducer) identical across batches
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


class TrainingModule(nn.Module):
    """The model plus what only training needs (the aux head), behind one forward that returns the losses.

    One module so that accelerate wraps (DDP/FSDP) both together and the aux head's gradients are reduced too.
    """

    def __init__(self, model, aux_head: PatchAuxiliaryHead | None = None, aux_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.aux_head = aux_head
        self.aux_weight = aux_weight
        self._features = None
        if aux_head is not None:
            backbone_for(model.config).vision_tower(model).register_forward_hook(self._keep_features)

    def _keep_features(self, module, args, output) -> None:
        hidden_states = getattr(output, "hidden_states", None)
        layer = self.model.config.vision_feature_layer
        self._features = hidden_states[layer] if hidden_states is not None and isinstance(layer, int) \
            else output.last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor], configuration: int | None = None,
                pool_stride: float | None = None):
        """The losses of one batch: in `configuration` (VISOR), or reading images pooled at `pool_stride`."""
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        if configuration is not None:
            inputs["configuration"] = configuration
        if pool_stride is not None:
            from visor.reduction.pool import pool

            inputs = pool(self.model, pool_stride).model_inputs(**inputs)
        self._features = None
        labels = inputs.pop("labels")
        predicting = labelled_predictions(labels)
        output = self.model(**inputs, use_cache=False, logits_to_keep=predicting)
        answer_loss = nn.functional.cross_entropy(output.logits.float().flatten(0, 1),
                                                  labels[:, predicting + 1].flatten(), ignore_index=-100)
        loss = answer_loss
        aux_loss = torch.zeros((), device=answer_loss.device)
        if self.aux_head is not None and "patch_targets" in batch:
            if self._features is None:
                raise RuntimeError("the vision tower did not run: no features for the auxiliary loss")
            targets = flatten_patch_targets(batch["patch_targets"], batch["image_sizes"], self.model.config)
            features = self._features
            if features.shape[1] != targets.shape[1]:  # e.g. a CLS token dropped by "default" selection
                features = features[:, -targets.shape[1]:]
            aux_loss = self.aux_head(features, targets.to(features.device))
            loss = loss + self.aux_weight * aux_loss
        self._features = None
        return loss, answer_loss.detach(), aux_loss.detach()


def labelled_predictions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits the loss reads: those predicting a labelled next token in any sample of the batch.

    The stock models' own loss makes logits for every position, image tokens included: at 7,290 visual tokens and a
    152k vocabulary that is gigabytes of logits (and of their gradient) of which the answer needs a few dozen rows.
    The same (position, label) pairs averaged the same way: the same loss as `labels=` gives the model."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def flatten_patch_targets(targets: torch.Tensor, image_sizes: torch.Tensor, config) -> torch.Tensor:
    """(B, crops, P) targets → (crops actually encoded, P), in the order the vision tower sees the crops."""
    if targets.dim() == 2:  # already one row per encoded crop
        return targets
    counts = [backbone_for(config).crops(size) for size in image_sizes.tolist()]
    return torch.cat([sample[:count] for sample, count in zip(targets, counts)])
