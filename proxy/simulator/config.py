"""Command-line options of the simulator (vLLM's spelling where vLLM has the option)."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

FAULTS = ("refuse", "hang", "500", "html_502", "cut", "error_chunk", "garbage", "huge_line", "slow_health")


@dataclass
class LoraModule:
    name: str
    path: str
    base_model_name: str | None = None


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    served_model_name: list[str] = field(default_factory=list)
    api_key: list[str] = field(default_factory=list)
    max_model_len: int = 32768
    max_num_seqs: int = 256
    lora_modules: list[LoraModule] = field(default_factory=list)
    enable_force_include_usage: bool = False
    error_format: str = "nested"  # "flat" = vLLM <= 0.10.0 bodies
    # simulated model
    response_tokens: int = 16
    embedding_dim: int = 1024
    kv_cache_tokens: int = 524288
    version: str = "0.11.0"
    # latency model (all in ms, all default 0 = no sleeping at all)
    ttft_ms: float = 0.0
    prefill_ms_per_token: float = 0.0
    itl_ms: float = 0.0
    load_factor: float = 1.0
    jitter: float = 0.0
    seed: int | None = None
    tokens_per_chunk: int = 1
    # faults
    fault: str | None = None
    dead: bool = False
    health_delay_s: float = 5.0
    legacy_metric_names: bool = False
    # vLLM's --runner: "generate" serves chat and completions, "pooling" only embeddings;
    # "auto" picks pooling for a model named like an embedding model (vLLM reads the architecture).
    runner: str = "auto"
    log_level: str = "warning"

    @property
    def pooling(self) -> bool:
        return self.runner == "pooling" or (self.runner == "auto" and any(
            word in self.model.lower() for word in ("embed", "bge-", "e5-", "gte-")))

    @property
    def served_names(self) -> list[str]:
        return self.served_model_name or [self.model]


def _lora(spec: str) -> LoraModule:
    spec = spec.strip()
    if spec.startswith("{"):
        d = json.loads(spec)
        return LoraModule(d["name"], d["path"], d.get("base_model_name"))
    if "=" not in spec:
        raise argparse.ArgumentTypeError(f"expected name=path or JSON, got {spec!r}")
    name, path = spec.split("=", 1)
    return LoraModule(name, path)


def _fault(value: str) -> str:
    if value not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {value!r}; one of {', '.join(FAULTS)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m proxy.simulator",
        description="A vLLM OpenAI-compatible server simulator (no GPU, no weights).",
    )
    a = p.add_argument
    a("model_tag", nargs="?", help="model, like `vllm serve <model>` (same as --model)")
    a("--host", default=d.host, help="bind address (vLLM binds all interfaces; use 0.0.0.0 in containers)")
    a("--port", type=int, default=d.port)
    a("--model", default=None, help=f"model path/name (default {d.model})")
    a("--served-model-name", nargs="+", default=[], metavar="NAME",
      help="API names; the first one is used in responses and metric labels")
    a("--api-key", nargs="+", default=[], metavar="KEY",
      help="require `Authorization: Bearer KEY` on /v1/* (env VLLM_API_KEY)")
    a("--max-model-len", type=int, default=d.max_model_len)
    a("--max-num-seqs", type=int, default=d.max_num_seqs, help="running slots; the rest wait (FIFO, unbounded)")
    a("--lora-modules", nargs="+", type=_lora, default=[], metavar="name=path",
      help='LoRA adapters: name=path or \'{"name":..,"path":..,"base_model_name":..}\'')
    a("--enable-force-include-usage", action="store_true")
    a("--error-format", choices=("nested", "flat"), default=d.error_format,
      help="nested = vLLM >= 0.10.1 {'error': {...}}; flat = older {'object': 'error', ...}")
    a("--response-tokens", type=int, default=d.response_tokens,
      help="tokens the simulated model generates before it stops on its own")
    a("--runner", choices=("auto", "generate", "pooling"), default=d.runner,
      help="generate: chat and completions; pooling: embeddings only (auto: by the model's name)")
    a("--embedding-dim", type=int, default=d.embedding_dim)
    a("--kv-cache-tokens", type=int, default=d.kv_cache_tokens,
      help="simulated KV cache size in tokens (for vllm:kv_cache_usage_perc)")
    a("--sim-version", dest="version", default=d.version, help="what GET /version reports")
    a("--ttft-ms", type=float, default=d.ttft_ms, help="base time to first token after the queue")
    a("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token)
    a("--itl-ms", type=float, default=d.itl_ms, help="inter-token latency at batch size 1")
    a("--load-factor", type=float, default=d.load_factor,
      help="ITL multiplier when all max-num-seqs slots run (linear in between)")
    a("--jitter", type=float, default=d.jitter, help="each delay is multiplied by 1±uniform(jitter)")
    a("--seed", type=int, default=None)
    a("--tokens-per-chunk", type=int, default=d.tokens_per_chunk, help="tokens per SSE chunk after the first")
    a("--fault", type=_fault, default=None, help=f"apply a fault to every /v1 request: {', '.join(FAULTS)}")
    a("--dead", action="store_true", help="engine dead: /health 503, /v1 POSTs 500 with an empty body")
    a("--health-delay-s", type=float, default=d.health_delay_s, help="/health delay under the slow_health fault")
    a("--legacy-metric-names", action="store_true",
      help="also expose vllm:gpu_cache_usage_perc and vllm:time_per_output_token_seconds")
    a("--log-level", default=d.log_level)
    return p


def parse_args(argv: list[str] | None = None) -> SimConfig:
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    model_tag = values.pop("model_tag")
    values["model"] = values["model"] or model_tag or SimConfig.model
    if not values["api_key"] and os.environ.get("VLLM_API_KEY"):
        values["api_key"] = [os.environ["VLLM_API_KEY"]]
    cfg = SimConfig(**values)
    if cfg.max_num_seqs < 1 or cfg.tokens_per_chunk < 1 or cfg.response_tokens < 1:
        build_parser().error("--max-num-seqs, --tokens-per-chunk and --response-tokens must be >= 1")
    return cfg
