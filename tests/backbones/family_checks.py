"""What the test modules of the Qwen-VL and InternVL families check alike, on each family's own tiny stock model
and prompt batch (tests/backbones/test_qwen_vl.py, tests/backbones/test_internvl.py): the dense oracle, mixed
batches, the layer kinds and the cache, the in-LLM baselines, checkpoints and FLOPs. The family module supplies
the model, the batch (images in `pixel_values`), and how one sample of the batch stands alone (`alone(row)`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from visor.backbones import family
from visor.config import Schedule
from visor.flops import llm_prefill_flops, vision_flops
from visor.reduction import fastv, shortv, sparsevlm
from visor.reduction.fastv import last_token_attention
from visor.reduction.pruned import PruningPlan, pruned

ATOL = 1e-5
Alone = Callable[[int], dict]  # row -> that sample of the batch, unpadded, with only its own images


def dense_of(stock):
    module = family(stock.config)
    return module.VISOR_MODEL.from_stock(stock, module.VISOR_MODEL.config_class.dense(stock.config)).eval()


def sparse_of(stock, seed: int = 5):
    """The default schedule with open CA gates and a random CPE, so that the new modules change the output."""
    model = family(stock.config).VISOR_MODEL.from_stock(stock).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.attention_gate.fill_(0.7)
        weight = model.position_encoding.conv.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


def padded(prompts: list[list[int]], padding: str, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompts` (token id lists) as one batch padded with `pad` on `padding`'s side: input_ids, attention_mask."""
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), pad)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        place = slice(length - len(prompt), None) if padding == "left" else slice(0, len(prompt))
        input_ids[row, place], attention_mask[row, place] = torch.tensor(prompt), 1
    return input_ids, attention_mask


@torch.no_grad()
def logits(model, batch, **kwargs) -> torch.Tensor:
    return model(**batch, **kwargs).logits


def counted(run) -> int:
    """FLOPs torch's FlopCounterMode counts in `run()`."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


# ---- the oracle ------------------------------------------------------------------------------------------------
def dense_logits_and_loss_equal_stock(stock, batch, image_token: int, images: int) -> None:
    valid = batch["attention_mask"].bool()
    assert not valid.all() and len(set((batch["input_ids"] == image_token).sum(dim=1).tolist())) == images
    dense = dense_of(stock)
    torch.testing.assert_close(logits(dense, batch)[valid], logits(stock, batch)[valid], atol=ATOL, rtol=0)
    # A target whose prediction is made at a padding position (the first real token, left-padded) is no target.
    first_real = batch["attention_mask"].cumsum(dim=1) == 1
    labels = batch["input_ids"].masked_fill(~valid | first_real | (batch["input_ids"] == image_token), -100)
    with torch.no_grad():
        expected, actual = stock(**batch, labels=labels).loss, dense(**batch, labels=labels).loss
    assert torch.isfinite(expected)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def dense_greedy_generation_equals_stock(stock, batch, pad: int) -> None:
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad)
    expected = stock.generate(**batch, **options)
    actual = dense_of(stock).generate(**batch, **options)
    new = actual[:, batch["input_ids"].shape[1]:]
    assert new.shape[1] == 6 and len(new.unique()) > 2
    assert torch.equal(actual, expected)


# ---- VISOR's layer kinds ------------------------------------------------------------------------------------------
def default_schedule_of_the_six_layer_model(sparse) -> None:
    assert sparse.config.cross_attention_layers == [0, 3]
    assert sparse.config.configurations == [[], [1], [1, 4]]


def mixed_batch_equals_each_sample_alone(sparse, batch, alone: Alone) -> None:
    mixed = [2, 0, 1, 2]
    together = logits(sparse, batch, configuration=mixed)
    valid = batch["attention_mask"].bool()
    for row, configuration in enumerate(mixed):
        expected = logits(sparse, alone(row), configuration=configuration)[0]
        torch.testing.assert_close(together[row][valid[row]], expected, atol=ATOL, rtol=0)


def configurations_differ_and_the_image_reaches_the_text(sparse, batch, image_token: int) -> None:
    outputs = [logits(sparse, batch, configuration=configuration) for configuration in range(3)]
    other = logits(sparse, dict(batch, pixel_values=batch["pixel_values"] + 1.0), configuration=0)
    valid = batch["attention_mask"].bool() & (batch["input_ids"] != image_token)
    for first, second in ((outputs[0], outputs[1]), (outputs[1], outputs[2]), (outputs[0], other)):
        assert (first - second)[valid].abs().max() > 1e-3


def a_text_token_reads_only_the_images_before_it(sparse, batch, changed_pixels: torch.Tensor,
                                                 first_slot_of_second: int) -> None:
    """With sample 0's second image changed (`changed_pixels`), every token before that image (its first slot at
    `first_slot_of_second`) is unchanged, in every configuration, and the last one is not."""
    for configuration in range(3):
        first = logits(sparse, batch, configuration=configuration)[0]
        second = logits(sparse, dict(batch, pixel_values=changed_pixels), configuration=configuration)[0]
        assert torch.equal(first[:first_slot_of_second], second[:first_slot_of_second])
        assert (first[-1] - second[-1]).abs().max() > 1e-4


def the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(sparse, batch) -> None:
    for configuration, sa_layers in enumerate(sparse.config.configurations):
        cache = sparse(**batch, configuration=configuration, use_cache=True).past_key_values
        assert sorted(cache.cross_keys) == sparse.config.cross_attention_layers
        assert sorted(cache.visual_keys) == sorted(sa_layers)


# ---- the in-LLM baselines -----------------------------------------------------------------------------------------
def in_llm_baseline_reduces_each_sample_as_alone(model, batch, alone: Alone) -> None:
    together = logits(model, batch, logits_to_keep=1)
    for row in range(len(batch["input_ids"])):
        torch.testing.assert_close(logits(model, alone(row), logits_to_keep=1)[0], together[row], atol=ATOL, rtol=0)


def in_llm_baselines_off_equal_stock_and_generate_with_the_cache(stock, batch, pad: int) -> None:
    valid = batch["attention_mask"].bool()
    expected = logits(stock, batch)
    for model in (fastv(stock, 2, 1.0), sparsevlm(stock, 1.0, [1, 3]), shortv(stock, 0.0)):
        torch.testing.assert_close(logits(model, batch)[valid], expected[valid], atol=ATOL, rtol=0)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=pad)
    assert torch.equal(fastv(stock, 2, 1.0).generate(**batch, **options), stock.generate(**batch, **options))


@torch.no_grad()
def fastv_scores_are_the_stock_attention_row_of_the_last_token(stock, batch) -> None:
    recorded = []

    def recording(*args):
        recorded.append(last_token_attention(*args))
        return recorded[-1]

    pruned(stock, PruningPlan({2: 0.5}, recording))(**batch, logits_to_keep=1)
    attentions = stock(**batch, output_attentions=True).attentions[1]
    torch.testing.assert_close(recorded[0], attentions[:, :, -1].mean(dim=1), atol=1e-6, rtol=0)


# ---- checkpoints and FLOPs ----------------------------------------------------------------------------------------
def save_load_round_trip_and_conversion_from_a_local_folder(stock, sparse, batch, folder) -> None:
    module = family(stock.config)
    sparse.save_pretrained(folder / "visor")
    assert AutoConfig.from_pretrained(folder / "visor").model_type == sparse.config.model_type
    loaded = module.VISOR_MODEL.from_pretrained(folder / "visor", attn_implementation="eager").eval()
    assert torch.equal(logits(loaded, batch, configuration=[0, 1, 2, 0]), logits(sparse, batch, configuration=[0, 1, 2, 0]))
    stock.save_pretrained(folder / "stock")
    dense = module.VISOR_MODEL.from_stock(folder / "stock", module.VISOR_MODEL.config_class.dense(stock.config))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(dense.eval(), batch)[valid], logits(stock, batch)[valid], atol=ATOL, rtol=0)


def prefill_flops_of_every_configuration_equal_the_flop_counter(sparse, batch, image_token: int, sizes) -> None:
    """One prompt with images of `sizes`: the vision side per image plus the LLM count of the prompt's tokens."""
    visual = int((batch["input_ids"] == image_token).sum())
    text = batch["input_ids"].shape[1] - visual
    vision = sum(vision_flops(sparse.config, size).total for size in sizes)
    for configuration in range(len(sparse.config.configurations)):
        measured = counted(lambda: sparse(**batch, configuration=configuration, logits_to_keep=1))
        schedule = Schedule.of(sparse.config, configuration)
        assert measured == vision + llm_prefill_flops(sparse.config, visual, text, schedule).total
