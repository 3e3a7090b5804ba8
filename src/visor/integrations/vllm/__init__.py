"""Serving VISOR checkpoints with vLLM (an out-of-tree plugin: no fork, no vendored copy).

`register` is the `vllm.general_plugins` entry point: every vLLM process calls it, and it registers
`visor.integrations.vllm.model.VisorForVllm` under `ARCHITECTURE` (and every served family's VISOR config). A VISOR
folder is served with a few engine arguments that say how to read it (`engine_arguments`): vLLM treats it as an
encoder-decoder model with M-RoPE positions (the model module says why) and runs one of its configurations, or
lets its router choose per request.
Only the model, processing, engine and bench modules import vLLM, which lives in its own environment
(`make serve-setup`).
"""

from __future__ import annotations

ARCHITECTURE = "VisorForVllm"
CONFIGURATION_KEY = "visor_configuration"  # in vLLM's `additional_config`
SERVED_MODEL_TYPES = ("visor", "visor_qwen2_vl", "visor_qwen2_5_vl", "visor_qwen3_vl")


def register() -> None:
    from importlib import import_module

    from vllm import ModelRegistry

    from visor.backbones import FAMILIES

    for model_type in SERVED_MODEL_TYPES:  # each family's module registers its VISOR config with AutoConfig,
        import_module(FAMILIES[model_type])  # through which vLLM reads the folder's config.json
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "visor.integrations.vllm.model:VisorForVllm")


def check_servable(config, configuration: int | str | None) -> int | str:
    """The configuration a server runs (None: the largest; "auto": the router's choice per request) for a checkpoint
    with this config; a ValueError names what cannot be served."""
    model_type = config.model_type
    if model_type not in SERVED_MODEL_TYPES:
        stock = f"visor_{model_type}" in SERVED_MODEL_TYPES or model_type == "llava_onevision"
        raise ValueError(f"vLLM serves VISOR checkpoints (model types {', '.join(SERVED_MODEL_TYPES)}); this "
                         f"checkpoint is {model_type!r}" + (" (a stock model: `visor convert` makes a VISOR one)"
                                                            if stock else ""))
    return config.check_choice(configuration, router_trained=bool(config.router_training))


def engine_arguments(model: str, configuration: int | str | None = None, dtype: str = "auto",
                     modality: str = "image", **engine_options) -> dict:
    """Keyword arguments of `vllm.LLM` / `EngineArgs` that serve the VISOR folder `model` with `configuration`
    (an index into its configurations, default the largest; or "auto": the router picks per request), its prompts
    taking one `modality` item each ("image", or "video" for LLaVA-OV), plus any other engine options."""
    import json
    from pathlib import Path

    config = json.loads((Path(model) / "config.json").read_text())
    if modality not in ("image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    if modality == "video" and config.get("model_type") != "visor":
        raise ValueError(f"vLLM serves VISOR video on LLaVA-OneVision checkpoints (model type 'visor'), not "
                         f"{config.get('model_type')!r}")
    # vLLM asks an encoder-decoder model for a decoder start token even when it starts none (the decoder prompt is
    # the model's own prompt): any id will do, the end-of-sequence one is always there.
    hf_overrides = {"architectures": [ARCHITECTURE], "is_encoder_decoder": True,
                    "decoder_start_token_id": config.get("text_config", {}).get("eos_token_id")}
    if config.get("model_type") == "visor":
        # LLaVA-OV's 1-D positions as three equal rows, so vLLM asks `VisorForVllm.get_mrope_input_positions`
        # (the Qwen-VL families' configs declare M-RoPE themselves).
        hf_overrides["rope_parameters"] = {"mrope_section": [1, 1, 1]}
    # One image (or video) per prompt: vLLM 0.32 schedules an encoder-decoder model's encoder inputs only where
    # they start within the decoder tokens of the step (`Scheduler._try_schedule_encoder_inputs`), so a second item,
    # which starts after the first one's tokens in the encoder prompt, would never be encoded. One modality per
    # engine: its scheduler takes an encoder-decoder model with one active modality only (`Scheduler.__init__`).
    limits = {"image": int(modality == "image")}
    if config.get("model_type") == "visor":  # LLaVA-OV's video modality (the Qwen-VL families' is not served)
        limits["video"] = int(modality == "video")
    arguments = dict(model=model, hf_overrides=hf_overrides, dtype=dtype, enforce_eager=True,
                     limit_mm_per_prompt=limits)
    if configuration is not None:
        arguments["additional_config"] = {CONFIGURATION_KEY: configuration}
    return arguments | engine_options
