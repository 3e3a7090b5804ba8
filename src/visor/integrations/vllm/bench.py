"""`visor bench --engine vllm`: the stock model served natively, the full model and VISOR configurations served by
vLLM through the plugin, at a preset's shapes.

Each row is one engine (in this process, the plan's dtype, random weights saved to a temporary folder):

- "native": the stock model's language model served by vLLM's own model class for it (Qwen2, Llama, Qwen3), with
  vLLM's defaults (its compilation included), each request's prompt given as its embeddings: the image's features
  in place, then the text, as the stock vision-language model feeds its language model. The anchor every speed-up
  is against: what a user serves without VISOR. (vLLM's own vision-language classes need torchvision, which does
  not import beside the CPU torch build; the vision tower is outside every row anyway.)
- "full": the dense conversion served through the plugin (every layer SA: vLLM caches every layer's visual keys):
  its distance to "native" is the plugin's own overhead.
- a VISOR row serves one configuration.

vLLM's platform decides the device. At each visual-token count every request carries one image of N_v tokens as
precomputed random features (Qwen-VL: with the nominal patch grid of that count), a different one per request,
and the plan's text:

- time to first token: one request alone, from submission to its first token (median of `repeats`, after a
  warm-up), the LLM prefill and vLLM's scheduling together;
- decoding at B concurrent requests (`--batch-sizes`, default 1,8,32): B requests are submitted together; once all
  have their first token, `decode_tokens` engine steps of all B decoding are timed (each makes B tokens);
- KV bytes per request: the blocks vLLM's pool gives a request of this size (`engine.footprint`), split into
  the visual caches and the text caches, and what the blocks take from the pool;
- requests that fit `--kv-budget GIB`: a pool of that many bytes, admitted as vLLM's scheduler admits requests
  (`engine.requests_that_fit`; the tests check it against the scheduler).
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from visor.backbones import backbone_for
from visor.benchmarking import DTYPES, BenchPlan, build_model
from visor.config import Schedule
from visor.data import build_tokenizer
from visor.data.processor import IMAGE_PLACEHOLDER
from visor.files import save_figure, write_json
from visor.flops import kv_cache_bytes, llm_prefill_flops

ENGINE_BATCH_SIZES = (1, 8, 32)


@dataclass
class ConcurrentDecoding:
    requests: int
    decode_tokens_per_s: float
    decode_s_per_step: float
    decode_speedup: float | None = None  # the native stock model's step time at this concurrency / this row's


@dataclass
class EngineRow:
    method: str  # "native" (the stock model by vLLM's own class), "full" (the dense conversion) or "visor"
    configuration: int | None
    visual_tokens: int
    text_tokens: int
    self_attention_layers: list[int]
    llm_prefill_flops: int
    time_to_first_token_s: float
    kv_blocks_per_request: int
    kv_reserved_bytes: int  # what the request's blocks take from the pool
    kv_bytes_visual: int
    kv_bytes_text: int
    requests_in_budget: int | None = None
    flops_ratio: float | None = None
    time_to_first_token_speedup: float | None = None
    kv_ratio: float | None = None  # the native stock model's reserved bytes / this row's
    concurrent: list[ConcurrentDecoding] = field(default_factory=list)


def run_engine_bench(plan: BenchPlan) -> list[EngineRow]:
    """Measure the stock model served natively, the full model and every VISOR configuration of `plan` in vLLM;
    rows sorted by visual tokens, speed-ups against the native row."""
    check_engine_plan(plan)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its pool and steps are read here
    from vllm import LLM

    from visor.integrations.vllm.engine import kv_cache_config

    batch_sizes = plan.batch_sizes or ENGINE_BATCH_SIZES
    tokenizer = build_tokenizer()  # vLLM needs one; prompts are token ids and outputs stay ids (random weights)
    specs = [("native", None), ("full", None)] + [("visor", index) for index in plan.visor_configurations]
    rows = []
    with tempfile.TemporaryDirectory(prefix="visor-bench-") as scratch, \
            tqdm(total=len(specs) * len(plan.visual_tokens), desc="visor bench (vllm)", unit="row") as progress:
        for method, configuration in specs:
            progress.set_postfix_str(f"{method} {'' if configuration is None else configuration}: building")
            folder = _checkpoint(plan, method, Path(scratch), tokenizer)
            llm = LLM(**_engine_options(plan, method, configuration, folder, max(batch_sizes)))
            pool = kv_cache_config(llm)
            for visual in plan.visual_tokens:
                progress.set_postfix_str(f"{method} {'' if configuration is None else configuration} Nv={visual}")
                rows.append(_measure(llm, pool, plan, method, configuration, visual, batch_sizes))
                progress.update()
            del llm
            gc.collect()
    for row in rows:
        native = next(other for other in rows if other.method == "native" and other.visual_tokens == row.visual_tokens)
        row.flops_ratio = native.llm_prefill_flops / row.llm_prefill_flops
        row.time_to_first_token_speedup = native.time_to_first_token_s / row.time_to_first_token_s
        row.kv_ratio = native.kv_reserved_bytes / row.kv_reserved_bytes
        for decoding, native_decoding in zip(row.concurrent, native.concurrent, strict=True):
            decoding.decode_speedup = native_decoding.decode_s_per_step / decoding.decode_s_per_step
    order = {"native": 0, "full": 1, "visor": 2}
    return sorted(rows, key=lambda row: (row.visual_tokens, order[row.method], row.configuration or 0))


def check_engine_plan(plan: BenchPlan) -> None:
    """What `--engine vllm` measures differently, refused before any model is built."""
    from visor.integrations.vllm import SERVED_MODEL_TYPES

    unsupported = [name for name, given in (("--baselines", plan.baselines), ("--batched-prefill", plan.batched_prefill),
                                            ("--end-to-end", plan.end_to_end),
                                            ("--video-frames", plan.video_frames)) if given]
    if unsupported:
        raise ValueError(f"--engine vllm measures the stock model, the full model and VISOR configurations only: "
                         f"{', '.join(unsupported)} run with the default engine")
    if plan.config.model_type not in SERVED_MODEL_TYPES:
        raise ValueError(f"--engine vllm serves {', '.join(SERVED_MODEL_TYPES)} models; {plan.preset!r} is "
                         f"{plan.config.model_type!r}")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM, which lives in its own environment: `make serve-setup` builds "
                         ".venv-serve (run .venv-serve/bin/visor bench there)")


def native_text_config(config):
    """The stock model's language model as the plain causal LM vLLM serves with its own class: the same shapes
    and weights layout; M-RoPE becomes 1-D RoPE (its three rows cost what one does)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kinds = {"qwen2": Qwen2Config, "qwen2_vl_text": Qwen2Config, "qwen2_5_vl_text": Qwen2Config,
             "llama": LlamaConfig, "qwen3_vl_text": Qwen3Config}
    text = config.text_config
    settings = {key: value for key, value in text.to_dict().items() if key not in ("model_type", "architectures")}
    settings["rope_parameters"] = {key: value for key, value in (text.rope_parameters or {}).items()
                                   if not key.startswith("mrope")}
    return kinds[text.model_type](**settings)


def _checkpoint(plan: BenchPlan, method: str, scratch: Path, tokenizer) -> Path:
    """Random weights of the row's model at the preset's shapes, saved with `tokenizer` where vLLM loads them from
    (the image token is the tokenizer's `<image>`: which embedding row it reads changes no cost)."""
    from transformers import AutoModelForCausalLM

    folder = scratch / method
    if not folder.exists():
        if method == "native":
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(native_text_config(plan.config), dtype=DTYPES[plan.dtype])
        else:
            model = build_model(plan.dense_config if method == "full" else plan.config, replace(plan, device="cpu"))
            model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        gc.collect()
    return folder


def _engine_options(plan: BenchPlan, method: str, configuration: int | None, folder: Path, requests: int) -> dict:
    """vLLM's engine arguments for the row: the plugin's for the full model and VISOR, vLLM's defaults for the
    native one (prefix caching off: every request's prompt is its own anyway)."""
    from visor.integrations.vllm import engine_arguments

    shared = dict(dtype=plan.dtype, max_num_seqs=requests, kv_cache_memory_bytes=_pool_bytes(plan, requests))
    text = plan.text_tokens + requests + plan.decode_tokens + 8
    if method == "native":
        return dict(model=str(folder), enable_prompt_embeds=True, enable_prefix_caching=False,
                    max_model_len=max(plan.visual_tokens) + text,
                    max_num_batched_tokens=max(plan.visual_tokens) + plan.text_tokens, **shared)
    return engine_arguments(str(folder), configuration, enable_mm_embeds=True, max_model_len=text,
                            max_num_batched_tokens=_batched_tokens(plan), **shared)


def _batched_tokens(plan: BenchPlan) -> int:
    """vLLM's token budget per step, which is also its encoder budget: room for the longest prompt, and for the
    largest image the processor makes (vLLM checks that, whatever the prompts)."""
    backbone = backbone_for(plan.config)
    largest = backbone.image_tokens(backbone.largest_image_size()).visual_tokens
    return max(max(plan.visual_tokens), largest) + plan.text_tokens


def _pool_bytes(plan: BenchPlan, requests: int) -> int:
    """A KV pool for `requests` requests of the full model at the largest visual-token count, with room for
    vLLM's block rounding and group padding."""
    per_request = sum(kv_cache_bytes(plan.config, max(plan.visual_tokens), plan.text_tokens + plan.decode_tokens + 8,
                                     Schedule.full(plan.config), DTYPES[plan.dtype].itemsize).values())
    return int(2 * (requests + 2) * per_request) + 256 * 2**20


def _measure(llm, pool, plan: BenchPlan, method: str, configuration: int | None, visual: int,
             batch_sizes: tuple[int, ...]) -> EngineRow:
    from visor.integrations.vllm.engine import footprint, requests_that_fit

    config = plan.config
    schedule = Schedule.of(config, configuration) if method == "visor" else Schedule.full(config)
    requests = _Requests(plan, method, visual)
    ttft = [_time_to_first_token(llm, requests) for _ in range(plan.repeats + 1)]
    text = plan.text_tokens + 1 + plan.decode_tokens  # prompt, first token, decoded tokens
    # The native model caches the image's tokens as text tokens, in every layer.
    size = footprint(pool, text + visual, 0) if method == "native" else footprint(pool, text, visual)
    row = EngineRow(method=method, configuration=configuration, visual_tokens=visual, text_tokens=plan.text_tokens,
                    self_attention_layers=sorted(schedule.self_attention),
                    llm_prefill_flops=llm_prefill_flops(config, visual, plan.text_tokens, schedule,
                                                        logits_tokens=1).total,
                    time_to_first_token_s=statistics.median(ttft[1:]), kv_blocks_per_request=size.blocks,
                    kv_reserved_bytes=size.reserved_bytes, kv_bytes_visual=size.visual_bytes,
                    kv_bytes_text=size.text_bytes)
    if plan.kv_budget_gib is not None:
        block_bytes = size.reserved_bytes // size.blocks
        budget_blocks = int(plan.kv_budget_gib * 2**30) // block_bytes
        row.requests_in_budget = (requests_that_fit(replace(pool, num_blocks=budget_blocks), text + visual, 0)
                                  if method == "native" else
                                  requests_that_fit(replace(pool, num_blocks=budget_blocks), text, visual))
    row.concurrent = [_concurrent_decoding(llm, requests, plan, count) for count in batch_sizes]
    return row


class _Requests:
    """The row's requests at one visual-token count, a different random image (and text) each: for the plugin,
    token ids and the image's features (Qwen-VL: with the nominal grid of that count); for the native model, the
    prompt's embeddings."""

    def __init__(self, plan: BenchPlan, method: str, visual: int):
        self.plan, self.method, self.visual = plan, method, visual
        self.count = itertools.count()
        self.image_token = build_tokenizer().convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.grid = backbone_for(plan.config).nominal_image_inputs(visual).get("image_grid_thw")

    def __call__(self) -> dict:
        plan, config = self.plan, self.plan.config
        generator = torch.Generator().manual_seed(next(self.count))
        hidden, dtype = config.text_config.hidden_size, DTYPES[plan.dtype]
        if self.method == "native":
            return {"prompt_embeds": torch.randn(self.visual + plan.text_tokens, hidden, generator=generator).to(dtype)}
        text = torch.randint(0, config.text_config.vocab_size, (plan.text_tokens,), generator=generator)
        text[text == self.image_token] = 0
        features = torch.randn(self.visual, hidden, generator=generator).to(dtype)
        image = features[None] if self.grid is None else {"image_embeds": features, "image_grid_thw": self.grid}
        return {"prompt_token_ids": [self.image_token] + text.tolist(), "multi_modal_data": {"image": image}}


def _parameters(tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)


_counter = itertools.count()  # request ids unique within this process


def _time_to_first_token(llm, requests: _Requests) -> float:
    engine = llm.llm_engine
    request = requests()
    start = time.perf_counter()
    engine.add_request(f"ttft-{next(_counter)}", request, _parameters(1))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def _concurrent_decoding(llm, requests: _Requests, plan: BenchPlan, count: int) -> ConcurrentDecoding:
    """`count` requests together: prefill them all, then time `decode_tokens` steps of all of them decoding. vLLM
    prefills some prompts per step and decodes the requests already prefilled meanwhile, so the first request has
    made up to `count` tokens before the last one's first: each may make `count` + `decode_tokens` + a few."""
    engine = llm.llm_engine
    steps = plan.decode_tokens
    ids = [f"decode-{next(_counter)}" for _ in range(count)]
    for request_id in ids:
        engine.add_request(request_id, requests(), _parameters(count + steps + 4))
    produced = dict.fromkeys(ids, 0)

    def step() -> int:
        new = 0
        for output in engine.step():
            tokens = len(output.outputs[0].token_ids)
            new += tokens - produced[output.request_id]
            produced[output.request_id] = tokens
        return new

    while min(produced.values()) < 1:
        step()
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += step()
    seconds = time.perf_counter() - start
    engine.abort_request(ids)  # the rest of their tokens would measure nothing
    while engine.has_unfinished_requests():
        engine.step()
    if tokens != count * steps:
        raise RuntimeError(f"the timed steps made {tokens} tokens, not one per request and step ({count} x {steps})")
    return ConcurrentDecoding(requests=count, decode_tokens_per_s=tokens / seconds, decode_s_per_step=seconds / steps)


# ---- outputs -----------------------------------------------------------------------------------------------------
def _label(row: EngineRow) -> str:
    if row.method != "visor":
        return {"native": "stock (vLLM's own)", "full": "full (plugin)"}[row.method]
    return f"VISOR {row.configuration} ({len(row.self_attention_layers)} SA)"


def write_engine_outputs(rows: list[EngineRow], output: str | Path) -> list[Path]:
    """`bench.json` and `decode.png` (decode tokens/s against concurrent requests) in `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = [write_json(output / "bench.json", [asdict(row) for row in rows])]
    counts = sorted({row.visual_tokens for row in rows})
    figure = Figure(figsize=(5 * len(counts), 4.5), layout="constrained")
    for axes, visual in zip(figure.subplots(1, len(counts), squeeze=False)[0], counts):
        for row in rows:
            if row.visual_tokens == visual:
                axes.plot([item.requests for item in row.concurrent],
                          [item.decode_tokens_per_s for item in row.concurrent], marker="o", label=_label(row),
                          color={"native": "black", "full": "grey"}.get(row.method))
        axes.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="decode tokens/s",
                 title=f"vLLM, {visual} visual tokens")
        axes.legend(fontsize="small")
    paths.append(save_figure(figure, output / "decode.png"))
    return paths


def engine_table(rows: list[EngineRow]) -> str:
    budget = rows[0].requests_in_budget is not None
    lines = [f"{'row':<18}{'Nv':>6}{'FLOPs ratio':>12}{'TTFT s':>9}{'speed-up':>10}{'KV MB/req':>11}"
             f"{'KV ratio':>10}{'visual MB':>11}{'text MB':>9}" + (f"{'in budget':>11}" if budget else "")]
    for row in rows:
        lines.append(f"{_label(row):<18}{row.visual_tokens:>6}{row.flops_ratio:>12.2f}{row.time_to_first_token_s:>9.3g}"
                     f"{row.time_to_first_token_speedup:>10.2f}{row.kv_reserved_bytes / 2**20:>11.3g}"
                     f"{row.kv_ratio:>10.2f}{row.kv_bytes_visual / 2**20:>11.3g}{row.kv_bytes_text / 2**20:>9.3g}"
                     + (f"{row.requests_in_budget:>11}" if budget else ""))
    lines += ["", f"{'row':<18}{'Nv':>6}{'requests':>10}{'step ms':>10}{'tokens/s':>10}{'speed-up':>10}"]
    for row in rows:
        for item in row.concurrent:
            lines.append(f"{_label(row):<18}{row.visual_tokens:>6}{item.requests:>10}{item.decode_s_per_step * 1e3:>10.4g}"
                         f"{item.decode_tokens_per_s:>10.4g}{item.decode_speedup:>10.2f}")
    return "\n".join(lines)
