"""`VisorForConditionalGeneration`: the dense oracle, the layer kinds, mixed batches, checkpoints and input errors."""

from __future__ import annotations

import contextlib
import os
import resource

import pytest
import torch

from visor import VisorConfig, VisorForConditionalGeneration, presets
from visor.modeling.layout import TokenLayout

IMAGE = presets.TINY_IMAGE_TOKEN_ID
ATOL = 1e-5


def dense_of(stock) -> VisorForConditionalGeneration:
    return VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config)).eval()


@torch.no_grad()
def logits(model, batch, **kwargs) -> torch.Tensor:
    return model(**batch, **kwargs).logits


def open_gates_and_cpe(model, seed: int = 5, gate: float = 0.7) -> VisorForConditionalGeneration:
    """Make the new modules do something, so that tests about them can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.attention_gate.fill_(gate)
        weight = model.position_encoding.conv.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def stock(stock_factory):
    """Six layers: the default schedule is CA [0, 3], SA candidates [1, 4], configurations [[], [1], [1, 4]]."""
    return stock_factory("tiny", num_layers=6)


@pytest.fixture(scope="module")
def batch(stock, batch_factory):
    return batch_factory(stock)


@pytest.fixture(scope="module")
def sparse(stock):
    torch.manual_seed(3)
    return open_gates_and_cpe(VisorForConditionalGeneration.from_stock(stock).eval())


def test_default_schedule_of_the_six_layer_model(sparse):
    """The structure tests below rely on this schedule; fail loudly if the defaults move."""
    config = sparse.config
    assert config.cross_attention_layers == [0, 3]
    assert config.self_attention_layers == [1, 4]
    assert config.configurations == [[], [1], [1, 4]]


# ---- the oracle: dense VISOR is the stock model --------------------------------------------------------------------------
ORACLE_CASES = [(preset, attention) for preset in ("tiny", "tiny-llama") for attention in ("eager", "sdpa")]


@pytest.fixture(scope="module", params=ORACLE_CASES, ids=lambda case: "-".join(case))
def oracle(request, stock_factory, batch_factory):
    """A stock model (Qwen2 or Llama text, GQA, eager or SDPA), its dense VISOR twin, and a hard batch."""
    preset, attention = request.param
    stock = stock_factory(preset, num_layers=4, attention=attention)
    assert stock.config.text_config.num_key_value_heads < stock.config.text_config.num_attention_heads
    batch = batch_factory(stock)
    return stock, dense_of(stock), batch


def test_oracle_batch_is_hard(oracle):
    """Left padding, several crops per image and different image-token counts, else the oracle proves little."""
    _, _, batch = oracle
    mask = batch["attention_mask"]
    assert (mask == 0).any() and (mask[:, -1] == 1).all()
    counts = (batch["input_ids"] == IMAGE).sum(dim=1)
    assert len(set(counts.tolist())) == len(counts)
    assert batch["pixel_values"].shape[1] > 1


def test_dense_logits_equal_stock(oracle):
    stock, dense, batch = oracle
    valid = batch["attention_mask"].bool()
    expected, actual = logits(stock, batch), logits(dense, batch)
    torch.testing.assert_close(actual[valid], expected[valid], atol=ATOL, rtol=0)


def test_dense_loss_equals_stock(oracle):
    """Targets are text tokens after the first real token (a prediction made at a padding position is not a target)."""
    stock, dense, batch = oracle
    first_real = batch["attention_mask"].cumsum(dim=1) == 1
    ignore = (batch["attention_mask"] == 0) | (batch["input_ids"] == IMAGE) | first_real
    labels = batch["input_ids"].masked_fill(ignore, -100)
    with torch.no_grad():
        expected = stock(**batch, labels=labels).loss
        actual = dense(**batch, labels=labels).loss
    assert torch.isfinite(expected)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_dense_greedy_generation_equals_stock(oracle):
    """Three padded rows (the largest image left out to keep the uncached decoding short)."""
    stock, dense, batch = oracle
    batch = {key: value[[0, 1, 3]] for key, value in batch.items()}
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, 120:], batch["attention_mask"][:, 120:]
    assert (batch["attention_mask"][:, 0] == 0).any()
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=presets.TINY_PAD_TOKEN_ID)
    expected = stock.generate(**batch, **options)
    actual = dense.generate(**batch, use_cache=False, **options)
    assert actual.shape[1] == batch["input_ids"].shape[1] + 5
    assert torch.equal(actual, expected)


@pytest.fixture(scope="module")
def text_only(left_pad):
    return left_pad([[1, 20, 30, 40, 50, 60], [1, 70, 80]])


def test_text_only_prompt_through_dense_visor_equals_stock(stock, text_only):
    valid = text_only["attention_mask"].bool()
    actual, expected = logits(dense_of(stock), text_only), logits(stock, text_only)
    torch.testing.assert_close(actual[valid], expected[valid], atol=ATOL, rtol=0)


def test_text_only_prompt_through_sparse_visor_equals_stock(stock, sparse, text_only):
    """No image tokens: CA blocks have nothing to read, even with open gates, so the text model is all that runs."""
    valid = text_only["attention_mask"].bool()
    for configuration in range(3):
        actual = logits(sparse, text_only, configuration=configuration)
        torch.testing.assert_close(actual[valid], logits(stock, text_only)[valid], atol=ATOL, rtol=0)


# ---- the new modules start as no-ops --------------------------------------------------------------------------
def test_fresh_conversion_equals_the_same_schedule_without_ca_blocks(stock, batch):
    """Zero gates and a zero CPE add exactly nothing: a freshly converted model equals one with no CA block."""
    fresh = VisorForConditionalGeneration.from_stock(stock).eval()
    without_ca = VisorForConditionalGeneration.from_stock(
        stock,
        VisorConfig.from_stock_config(stock.config, cross_attention_layers=[], self_attention_layers=[1, 4]),
    ).eval()
    assert len(fresh.cross_attention) == 2 and len(without_ca.cross_attention) == 0
    for configuration in range(3):
        assert torch.equal(
            logits(fresh, batch, configuration=configuration), logits(without_ca, batch, configuration=configuration)
        )


@pytest.mark.parametrize("build", [VisorForConditionalGeneration, VisorForConditionalGeneration._from_config],
                         ids=["constructor", "_from_config"])
def test_a_model_built_from_a_config_starts_with_zero_gates_and_a_zero_cpe(build):
    """Built without a stock model (from a preset, as `visor bench` and `visor train --model` do), the new modules
    start as no-ops too (the CPE's convolution used to keep transformers' random initialisation)."""
    model = build(VisorConfig.from_stock_config(presets.tiny()))
    assert not model.position_encoding.conv.weight.any() and not model.position_encoding.conv.bias.any()
    assert all(not block.attention_gate.any() for block in model.cross_attention.values())


def test_conversion_keeps_every_stock_weight(stock, sparse):
    visor_state = sparse.state_dict()
    for name, weight in stock.state_dict().items():
        assert torch.equal(visor_state[name], weight), name


# ---- mixed batches -------------------------------------------------------------------------------------------
MIXED = [0, 2, 1, 2]


def test_mixed_batch_equals_each_sample_alone(sparse, batch):
    mixed = logits(sparse, batch, configuration=MIXED)
    for row, configuration in enumerate(MIXED):
        alone_batch = {key: value[row: row + 1] for key, value in batch.items()}
        alone = logits(sparse, alone_batch, configuration=configuration)
        valid = batch["attention_mask"][row].bool()
        torch.testing.assert_close(mixed[row, valid], alone[0, valid], atol=ATOL, rtol=0)


def test_mixed_batch_sample_equals_its_unpadded_run(sparse, batch):
    """Without the padding columns (same positions), a sample gives the same logits as inside the padded batch."""
    mixed = logits(sparse, batch, configuration=MIXED)
    for row, configuration in enumerate(MIXED):
        valid = batch["attention_mask"][row].bool()
        positions = valid.nonzero().squeeze(1)[None]
        alone = logits(
            sparse,
            dict(input_ids=batch["input_ids"][row: row + 1, valid], pixel_values=batch["pixel_values"][row: row + 1],
                 image_sizes=batch["image_sizes"][row: row + 1]),
            position_ids=positions, configuration=configuration,
        )
        torch.testing.assert_close(mixed[row, valid], alone[0], atol=ATOL, rtol=0)


def test_configurations_really_differ(sparse, batch):
    """Guard for the mixed-batch tests: with open gates and a random CPE every configuration changes the logits."""
    outputs = [logits(sparse, batch, configuration=index) for index in range(3)]
    valid = batch["attention_mask"].bool()
    for first in range(3):
        for second in range(first + 1, 3):
            assert (outputs[first] - outputs[second])[valid].abs().max() > 1e-3


# ---- structure: which tokens each layer sees ------------------------------------------------------------------
@contextlib.contextmanager
def record_layer_calls(model):
    """Record (layer index, input hidden states, output hidden states) of every decoder-layer call."""
    calls = []
    handles = [
        layer.register_forward_hook(
            lambda module, args, kwargs, output, index=index: calls.append((index, args[0].detach(), output.detach())),
            with_kwargs=True,
        )
        for index, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_sa_layers_see_the_full_sequence_other_layers_only_text(sparse, batch):
    batch_size, length = batch["input_ids"].shape
    text_width = int((batch["input_ids"] != IMAGE).sum(dim=1).max())
    for configuration, sa_layers in enumerate(sparse.config.configurations):
        with record_layer_calls(sparse) as calls:
            logits(sparse, batch, configuration=configuration)
        seen = {index: tuple(hidden.shape[:2]) for index, hidden, _ in calls}
        assert len(calls) == sparse.config.num_layers
        for index in range(sparse.config.num_layers):
            expected = (batch_size, length) if index in sa_layers else (batch_size, text_width)
            assert seen[index] == expected, (configuration, index)


def test_mixed_batch_runs_sa_only_for_the_rows_that_chose_it(sparse, batch):
    """Layer 4 is SA for configuration 2 only: two full-length rows and two text-only rows, in two calls."""
    length = batch["input_ids"].shape[1]
    text_width = int((batch["input_ids"] != IMAGE).sum(dim=1).max())
    with record_layer_calls(sparse) as calls:
        logits(sparse, batch, configuration=MIXED)
    layer_4 = sorted(tuple(hidden.shape[:2]) for index, hidden, _ in calls if index == 4)
    assert layer_4 == [(2, text_width), (2, length)]
    layer_1 = sorted(tuple(hidden.shape[:2]) for index, hidden, _ in calls if index == 1)
    assert layer_1 == [(1, text_width), (3, length)]


def test_visual_states_change_only_in_sa_layers(sparse, batch):
    """Visual states entering each SA layer are exactly those the previous SA layer (or the embedding) produced:
    CA and text layers leave them untouched; each SA layer changes them."""
    configuration = sparse.config.largest_configuration
    layout = TokenLayout.build(batch["input_ids"] == IMAGE, batch["attention_mask"])
    with torch.no_grad():
        embedded, _, _ = sparse.embed_multimodal(batch["input_ids"], pixel_values=batch["pixel_values"],
                                              image_sizes=batch["image_sizes"])
    final = []
    norm_hook = sparse.model.language_model.norm.register_forward_hook(
        lambda module, args, output: final.append(args[0].detach())
    )
    try:
        with record_layer_calls(sparse) as calls:
            logits(sparse, batch, configuration=configuration)
    finally:
        norm_hook.remove()
    sa_calls = [(hidden, output) for _, hidden, output in calls if hidden.shape[1] == layout.length]
    assert len(sa_calls) == len(sparse.config.configurations[configuration]) == 2
    visual_valid = layout.visual.valid
    current = layout.split(embedded)[0]
    for hidden, output in sa_calls:
        visual_in, visual_out = layout.split(hidden)[0], layout.split(output)[0]
        assert torch.equal(visual_in[visual_valid], current[visual_valid])
        assert (visual_out - visual_in)[visual_valid].abs().max() > 1e-3
        current = visual_out
    assert torch.equal(layout.split(final[0])[0][visual_valid], current[visual_valid])


@pytest.fixture(scope="module")
def vision_blind(stock):
    config = VisorConfig.from_stock_config(stock.config, cross_attention_layers=[], self_attention_layers=[])
    assert config.configurations == [[]]
    return VisorForConditionalGeneration.from_stock(stock, config).eval()


def test_without_ca_and_sa_layers_text_ignores_the_image(stock, vision_blind, batch):
    other_pixels = dict(batch, pixel_values=batch["pixel_values"] + 1.0)
    text = (batch["input_ids"] != IMAGE) & batch["attention_mask"].bool()
    assert torch.equal(logits(vision_blind, batch)[text], logits(vision_blind, other_pixels)[text])
    # The control: the dense model does read the image at the same positions.
    dense = dense_of(stock)
    assert (logits(dense, batch)[text] - logits(dense, other_pixels)[text]).abs().max() > 1e-3


def test_text_before_the_image_reads_no_vision_and_stays_finite(stock, sparse, batch_factory):
    """Image after the question: text rows with no visual token before them get zero CA output (never NaN)."""
    late = batch_factory(stock, text_before=[5, 7, 2, 6], text_after=2)
    other_pixels = dict(late, pixel_values=late["pixel_values"] + 1.0)
    first_image = (late["input_ids"] == IMAGE).int().argmax(dim=1, keepdim=True)
    order = torch.arange(late["input_ids"].shape[1])[None]
    before = (order < first_image) & late["attention_mask"].bool()
    after = (order > first_image) & (late["input_ids"] != IMAGE)
    for configuration in range(3):
        first = logits(sparse, late, configuration=configuration)
        second = logits(sparse, other_pixels, configuration=configuration)
        assert torch.isfinite(first[late["attention_mask"].bool()]).all()
        assert torch.equal(first[before], second[before])
        assert (first[after] - second[after]).abs().max() > 1e-3


# ---- checkpoints --------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(sparse, batch, tmp_path):
    sparse.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    # The attention kernel is a run-time choice that checkpoints do not store; ask for the one `sparse` uses.
    loaded = VisorForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.configurations == sparse.config.configurations
    assert loaded.config.cross_attention_layers == sparse.config.cross_attention_layers
    for configuration in (0, MIXED):
        assert torch.equal(logits(loaded, batch, configuration=configuration), logits(sparse, batch, configuration=configuration))


def test_from_stock_accepts_a_local_checkpoint_folder(stock, batch, tmp_path):
    stock.save_pretrained(tmp_path)
    dense = VisorForConditionalGeneration.from_stock(str(tmp_path), VisorConfig.dense(stock.config)).eval()
    valid = batch["attention_mask"].bool()
    assert dense.config.text_config._attn_implementation == "sdpa"  # loaded with the default kernel: not bit-exact
    torch.testing.assert_close(logits(dense, batch)[valid], logits(stock, batch)[valid], atol=ATOL, rtol=0)
    sparse = VisorForConditionalGeneration.from_stock(tmp_path)
    assert sparse.config.cross_attention_layers == [0, 3]


@contextlib.contextmanager
def memory_ceiling(extra_bytes: int = 3 * 2**30):
    """Cap this process's address space while a loader runs: a loader that falls back to a default (7B-sized)
    config must fail fast here instead of exhausting the machine's memory."""
    with open("/proc/self/status") as status:
        current = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = current + extra_bytes if hard == resource.RLIM_INFINITY else min(current + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _remove_config(folder):
    (folder / "config.json").unlink()


LOADERS = {
    "from_stock": lambda folder: VisorForConditionalGeneration.from_stock(folder),
    "from_pretrained": lambda folder: VisorForConditionalGeneration.from_pretrained(folder),
}
BREAKAGES = {"truncated-safetensors": (_truncate_weights, "safetensors|model.safetensors|truncated|incomplete"),
             "missing-config": (_remove_config, "config.json")}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_broken_checkpoint_folder_is_a_clear_value_error(stock, sparse, tmp_path, loader, breakage):
    (sparse if loader == "from_pretrained" else stock).save_pretrained(tmp_path)
    damage, message = BREAKAGES[breakage]
    damage(tmp_path)
    with memory_ceiling(), pytest.raises(ValueError, match=message):
        LOADERS[loader](tmp_path)


def test_from_stock_rejects_a_path_that_is_not_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VisorForConditionalGeneration.from_stock(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not exist"):  # a hub name is not looked up
        VisorForConditionalGeneration.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a local checkpoint folder"):
        VisorForConditionalGeneration.from_stock(tmp_path / "weights.bin")


def test_from_stock_rejects_config_and_options_together(stock):
    with pytest.raises(ValueError, match="either visor_config or config options"):
        VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config), position_encoding=False)


# ---- bad input ----------------------------------------------------------------------------------------------
def _edit(batch, **changes):
    return dict(batch, **changes)


def _without_one_image_token(batch):
    input_ids = batch["input_ids"].clone()
    first = int((input_ids[0] == IMAGE).nonzero()[0])
    input_ids[0, first] = 7
    return _edit(batch, input_ids=input_ids)


def _out_of_vocab(batch, value):
    input_ids = batch["input_ids"].clone()
    input_ids[1, -1] = value
    return _edit(batch, input_ids=input_ids)


BAD_INPUTS = {
    "configuration-too-large": (lambda b: (b, dict(configuration=3)), "configuration 3 does not exist"),
    "configuration-negative": (lambda b: (b, dict(configuration=-1)), "configuration -1 does not exist"),
    "configuration-list-too-short": (lambda b: (b, dict(configuration=[0, 1])), "2 entries for a batch of 4"),
    "configuration-list-bad-entry": (lambda b: (b, dict(configuration=[0, 1, 2, 5])), "configuration 5 does not exist"),
    "image-token-count": (lambda b: (_without_one_image_token(b), {}), "image-token count does not match"),
    "missing-pixel-values": (lambda b: (_edit(b, pixel_values=None), {}), "pixel_values/image_sizes are missing"),
    "missing-image-sizes": (lambda b: (_edit(b, image_sizes=None), {}), "pixel_values/image_sizes are missing"),
    "pixel-values-3d": (lambda b: (_edit(b, pixel_values=b["pixel_values"][0, 0]), {}), "pixel_values must be"),
    "image-sizes-1d": (lambda b: (_edit(b, image_sizes=b["image_sizes"][:, 0]), {}), "image_sizes must be"),
    "image-sizes-3-columns": (
        lambda b: (_edit(b, image_sizes=torch.cat([b["image_sizes"], b["image_sizes"][:, :1]], 1)), {}),
        "image_sizes must be",
    ),
    "attention-mask-shape": (lambda b: (_edit(b, attention_mask=b["attention_mask"][:, 1:]), {}), "attention_mask"),
    "token-id-too-large": (lambda b: (_out_of_vocab(b, presets.TINY_VOCAB_SIZE), {}), r"input_ids must lie in \[0, 512\)"),
    "token-id-negative": (lambda b: (_out_of_vocab(b, -2), {}), r"input_ids must lie in \[0, 512\)"),
    "input-ids-1d": (lambda b: (_edit(b, input_ids=b["input_ids"][0]), {}), r"input_ids must be \(batch, sequence\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(sparse, batch, case):
    make, message = BAD_INPUTS[case]
    inputs, options = make(batch)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        sparse(**inputs, **options)


def test_inputs_embeds_without_input_ids_is_rejected(sparse, batch):
    embeds = sparse.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="needs input_ids"):
        sparse(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_generate_rejects_an_unknown_configuration(sparse, batch):
    with pytest.raises(ValueError, match="does not exist"):
        sparse.generate(**batch, configuration=9, max_new_tokens=1, use_cache=False, pad_token_id=0)


def test_environment_is_offline():
    """Model loading in these tests must never reach a hub."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# ---- activation checkpointing ---------------------------------------------------------------------------------------
def _training_step(model, batch, checkpointing: bool, **kwargs):
    """(loss, gradients, bytes of activations kept for the backward pass) of one step."""
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False))
    kept = [0]

    def keep(tensor):
        kept[0] += tensor.numel() * tensor.element_size()
        return tensor

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.zero_grad()
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(**batch, labels=labels, use_cache=False, **kwargs).loss
        loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad()
        model.eval()
    return loss.detach(), gradients, kept[0]


@pytest.mark.parametrize("kind", ["stock", "visor"])
def test_activation_checkpointing_keeps_less_and_changes_nothing(stock, sparse, batch, kind):
    model, options = (stock, {}) if kind == "stock" else (sparse, dict(configuration=[0, 1, 2, 1]))
    loss, gradients, kept = _training_step(model, batch, False, **options)
    loss_checkpointed, gradients_checkpointed, kept_checkpointed = _training_step(model, batch, True, **options)
    assert torch.equal(loss, loss_checkpointed) and gradients.keys() == gradients_checkpointed.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_checkpointed[name], gradient, atol=1e-6, rtol=0)
    assert kept_checkpointed < kept / 2, (kept, kept_checkpointed)
    if kind == "visor":  # the CA blocks are checkpointed too: their gradients reach the gates
        assert all(gradients[f"cross_attention.{layer}.attention_gate"].abs().sum() > 0 for layer in ("0", "3"))
