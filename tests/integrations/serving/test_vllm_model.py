"""The vLLM model (`visor.integrations.vllm.model`) in a real vLLM engine: greedy outputs equal
`VisorForConditionalGeneration.generate`'s for every configuration (and the dense conversion equals the stock
model, in transformers and served by vLLM's own class), the engine declares visual caches exactly where VISOR
keeps them, and what cannot be served is refused.
Skipped where vLLM is not installed (the main environment), but never in CI: `make test-serve` sets
VISOR_REQUIRE_VLLM=1, which turns a missing vLLM into a failure."""

from __future__ import annotations

import gc
import os

import pytest
import torch

if not os.environ.get("VISOR_REQUIRE_VLLM"):
    pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaOnevisionForConditionalGeneration  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from visor import VisorConfig, VisorForConditionalGeneration  # noqa: E402
from visor.config import Schedule  # noqa: E402
from visor.data import VisorProcessor  # noqa: E402
from visor.data.processor import IMAGE_PLACEHOLDER  # noqa: E402
from visor.flops import kv_cache_bytes  # noqa: E402
from visor.integrations.vllm import engine_arguments  # noqa: E402
from visor.integrations.vllm.engine import footprint, kv_cache_config, requests_that_fit  # noqa: E402

NEW_TOKENS = 8


def engine(folder, configuration=None, **options) -> LLM:
    return LLM(**engine_arguments(str(folder), configuration, dtype="float32",
                                  **{"max_num_seqs": 8, "kv_cache_memory_bytes": 64 * 2**20, **options}))


def release(llm: LLM) -> None:
    del llm
    gc.collect()


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt `VisorProcessor` renders for one image and question, with a single `<image>` id (vLLM expands it)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_answers(model, folder, samples, **generate_options) -> list[list[int]]:
    """Greedy answers of a transformers model on the samples (one left-padded batch), cut after the first EOS."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = VisorProcessor(model.config, tokenizer, padding_side="left")
    inputs = processor([sample.image for sample in samples], [sample.question for sample in samples])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **generate_options)
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        answers.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return answers


def served_answers(llm: LLM, folder, samples) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    requests = [{"prompt_token_ids": prompt_ids(tokenizer, sample.question), "multi_modal_data": {"image": sample.image}}
                for sample in samples]
    outputs = llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    return [list(output.outputs[0].token_ids) for output in outputs]


@pytest.fixture(scope="module")
def visor_answers(served_folders, image_questions):
    model = VisorForConditionalGeneration.from_pretrained(served_folders["visor"]).eval()
    return {configuration: reference_answers(model, served_folders["visor"], image_questions,
                                             configuration=configuration)
            for configuration in range(len(model.config.configurations))}


def test_the_references_tell_configurations_apart(visor_answers, image_questions):
    """The comparison below has something to compare: configurations answer differently, and answers vary."""
    assert len({tuple(map(tuple, answers)) for answers in visor_answers.values()}) > 1
    assert len({tuple(answer) for answers in visor_answers.values() for answer in answers}) > 3


@pytest.mark.parametrize("configuration", [0, 1, 2])
def test_greedy_outputs_equal_generate(served_folders, image_questions, visor_answers, configuration):
    llm = engine(served_folders["visor"], configuration)
    try:
        assert served_answers(llm, served_folders["visor"], image_questions) == visor_answers[configuration]
    finally:
        release(llm)


def test_default_configuration_is_the_largest(served_folders, image_questions, visor_answers):
    llm = engine(served_folders["visor"])
    try:
        assert served_answers(llm, served_folders["visor"], image_questions[:2]) == visor_answers[2][:2]
    finally:
        release(llm)


def test_dense_conversion_equals_the_stock_model(served_folders, image_questions):
    """The full model in the same engine: every layer SA, every layer's visual keys in a cross-attention cache."""
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(served_folders["stock"]).eval()
    expected = reference_answers(stock, served_folders["stock"], image_questions)
    llm = engine(served_folders["dense"])
    try:
        assert served_answers(llm, served_folders["dense"], image_questions) == expected
    finally:
        release(llm)


def native_prompt_embeddings(stock, folder, samples) -> list[torch.Tensor]:
    """What the stock model feeds its language model for each sample: the prompt's embeddings, image features in
    place (read where the language model receives them)."""
    processor = VisorProcessor(stock.config, AutoTokenizer.from_pretrained(folder))
    captured = []
    hook = stock.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"][0]), with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in samples:
                stock(**processor([sample.image], [sample.question]))
    finally:
        hook.remove()
    return captured


def natively_served_answers(folder, embeddings) -> list[list[int]]:
    """Greedy answers of a causal LM served by vLLM's own class, prompts given as embeddings (the engine is gone
    when this returns: a second engine must not start beside it)."""
    llm = LLM(model=str(folder), dtype="float32", enable_prompt_embeds=True, max_num_seqs=8,
              kv_cache_memory_bytes=64 * 2**20)
    outputs = llm.generate([{"prompt_embeds": embedding} for embedding in embeddings],
                           SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    del llm
    gc.collect()
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_dense_conversion_equals_the_stock_model_served_natively(served_folders, image_questions, tmp_path):
    """The stock model's language model served by vLLM's own class (Qwen2ForCausalLM) on the stock model's prompt
    embeddings answers as the dense conversion served through the plugin."""
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(served_folders["stock"]).eval()
    native = AutoModelForCausalLM.from_config(stock.config.text_config)
    native.model.load_state_dict(stock.model.language_model.state_dict())
    native.lm_head.load_state_dict(stock.lm_head.state_dict())
    native.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(served_folders["stock"]).save_pretrained(tmp_path)
    expected = natively_served_answers(tmp_path, native_prompt_embeddings(stock, served_folders["stock"],
                                                                          image_questions))
    llm = engine(served_folders["dense"])
    try:
        assert served_answers(llm, served_folders["dense"], image_questions) == expected
    finally:
        release(llm)


@pytest.mark.parametrize("configuration", [0, 2])
def test_visual_caches_sit_where_visor_keeps_them(served_folders, image_questions, configuration):
    """Text caches in every layer; visual ones for the CA blocks and the served configuration's SA layers, with the
    bytes `visor.flops.kv_cache_bytes` gives (token counts rounded up to vLLM's blocks); the pool is the memory the
    engine was given."""
    model = VisorForConditionalGeneration.from_pretrained(served_folders["visor"])
    config = model.config
    llm = engine(served_folders["visor"], configuration)
    try:
        cache = kv_cache_config(llm)
    finally:
        release(llm)
    names = [name for group in cache.kv_cache_groups for name in group.layer_names]
    layers = {kind: sorted(int(name.rsplit(".", 1)[1]) for name in names if f".{kind}." in name)
              for kind in ("cross_caches", "visual_caches")}
    layers["text_caches"] = sorted(int(name.split(".layers.")[1].split(".")[0]) for name in names
                                   if name.endswith(".self_attn.attn"))
    assert layers == {"text_caches": list(range(config.num_layers)),
                      "cross_caches": sorted(config.cross_attention_layers),
                      "visual_caches": sorted(config.configurations[configuration])}
    assert max(tensor.offset + tensor.size for tensor in cache.kv_cache_tensors) == 64 * 2**20
    block = cache.kv_cache_groups[0].kv_cache_spec.block_size
    text, visual = 23, 336
    measured = footprint(cache, text, visual)
    rounded = -(-text // block) * block, -(-visual // block) * block
    expected = kv_cache_bytes(config, rounded[1], rounded[0], Schedule.of(config, configuration), element_size=4)
    assert (measured.visual_bytes, measured.text_bytes) == (expected["visual"], expected["text"])


def test_as_many_requests_run_together_as_the_pool_holds(served_folders, image_questions):
    """`requests_that_fit` is what vLLM's scheduler does: with a pool of exactly three requests' blocks, two run at
    once (vLLM keeps one block back) and the rest wait."""
    sample = image_questions[0]
    tokenizer = AutoTokenizer.from_pretrained(served_folders["visor"])
    ids = prompt_ids(tokenizer, sample.question)
    probe = engine(served_folders["visor"], 2)
    try:
        pool = kv_cache_config(probe)
        block_bytes = max(tensor.offset + tensor.size for tensor in pool.kv_cache_tensors) // pool.num_blocks
        visual = len(VisorProcessor(probe.llm_engine.model_config.hf_config, tokenizer)(
            [sample.image], [sample.question])["input_ids"][0]) - len(ids) + 1
        blocks = footprint(pool, len(ids) - 1 + NEW_TOKENS, visual).blocks
    finally:
        release(probe)
    # vLLM checks that the pool holds one request of the longest prompt and image: short ones here.
    llm = engine(served_folders["visor"], 2, kv_cache_memory_bytes=3 * blocks * block_bytes, max_model_len=64,
                 max_num_batched_tokens=512)
    try:
        pool = kv_cache_config(llm)
        fit = requests_that_fit(pool, len(ids) - 1 + NEW_TOKENS, visual)
        assert (pool.num_blocks, fit) == (3 * blocks, 2)
        core = llm.llm_engine
        for index in range(2 * fit + 1):
            core.add_request(str(index), {"prompt_token_ids": ids, "multi_modal_data": {"image": sample.image}},
                             SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
        running, finished = 0, 0
        while core.has_unfinished_requests():
            finished += sum(output.finished for output in core.step())
            running = max(running, len(core.engine_core.engine_core.scheduler.running))
        assert (running, finished) == (fit, 2 * fit + 1)
    finally:
        release(llm)


@pytest.mark.parametrize("checkpoint, configuration, message", [
    ("visor", 3, "configuration 3 does not exist: this model has configurations 0..2"),
    ("stock", None, "this checkpoint is 'llava_onevision'"),
])
def test_engine_refuses_what_it_cannot_serve(served_folders, checkpoint, configuration, message):
    with pytest.raises(Exception, match=message):
        engine(served_folders[checkpoint], configuration)


@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (1, 2)])
def test_model_parallelism_is_refused(served_folders, tensor, pipeline):
    """Before any module is built (a real second rank is more than this machine runs)."""
    from types import SimpleNamespace

    from visor.integrations.vllm.model import VisorForVllm

    config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=VisorConfig.from_pretrained(served_folders["visor"])),
        additional_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline))
    with pytest.raises(ValueError, match="serve it on one rank"):
        VisorForVllm(vllm_config=config)


def test_a_prompt_with_two_images_is_refused(served_folders, image_questions):
    llm = engine(served_folders["visor"], 0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(served_folders["visor"])
        ids = prompt_ids(tokenizer, "what is in both images ?")
        two = {"prompt_token_ids": ids, "multi_modal_data": {"image": [image_questions[0].image] * 2}}
        with pytest.raises(Exception, match="At most 1 image"):
            llm.generate([two], SamplingParams(max_tokens=2))
        assert len(served_answers(llm, served_folders["visor"], image_questions[:1])[0]) > 0  # still serving
    finally:
        release(llm)


def test_the_router_picks_per_request_as_generate_does(served_folders, image_questions, tmp_path):
    """`configuration="auto"`: each request runs what the router picks for it, in a batch mixing configurations,
    and decodes with that configuration's caches (every SA candidate keeps a visual cache). τ is set midway
    between two samples' probabilities of the cheapest configuration, so the batch mixes (and no sample sits on τ)."""
    folder = served_folders["routed"]
    model = VisorForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = VisorProcessor(model.config, tokenizer, padding_side="left")(
        [sample.image for sample in image_questions], [sample.question for sample in image_questions])
    logits = []
    hook = model.router.register_forward_hook(lambda module, args, output: logits.append(output))
    with torch.no_grad():
        model(**inputs, configuration="auto")
    hook.remove()
    cheapest = sorted(model.router.decision_scores(logits[0])[:, 0].tolist())
    model.configure_router(threshold=(cheapest[2] + cheapest[3]) / 2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with torch.no_grad():
        chosen = model(**inputs, configuration="auto").configuration
    assert len(set(chosen.tolist())) > 1, chosen  # the batch mixes configurations
    expected = reference_answers(model, tmp_path, image_questions, configuration="auto")
    llm = engine(tmp_path, "auto")
    try:
        assert served_answers(llm, tmp_path, image_questions) == expected
    finally:
        release(llm)
