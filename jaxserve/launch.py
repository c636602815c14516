"""`python -m jaxserve.launch`: flags and/or a YAML preset -> ServerConfig -> warm engine + uvicorn.

The socket is bound first and answers 503 while the engine loads and compiles; the "serving at" line is
printed only once requests can be served. SIGINT/SIGTERM stop accepting, give in-flight requests
`graceful_shutdown_timeout_s` to finish, abort the rest, and exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jaxserve.config import EngineConfig, ServerConfig

if TYPE_CHECKING:
    from jaxserve.server.state import ServerState

logger = logging.getLogger("jaxserve.launch")

# flag dest -> (which config, field name); YAML keys are the same names (dashes or underscores).
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)} - {"engine"}
_ALIASES = {  # SGLang / vLLM spellings users already know
    "mem_fraction_static": "kv_memory_fraction",
    "chunked_prefill_size": "max_num_batched_tokens",
    "tp": "tp_size",
    "dp": "dp_size",
    "context_length": "max_model_len",
}


def _cache_dir_flag(value: str) -> str | None:
    return None if value.lower() in ("none", "off", "") else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxserve.launch",
        description="OpenAI-compatible LLM server in JAX. Flags override values from --config.",
    )
    S = argparse.SUPPRESS  # unset flags stay absent, so the YAML file and the dataclass defaults apply
    p.add_argument("--config", default=None, help="YAML file, or a preset name: cpu, gpu, tpu (configs/NAME.yaml)")
    p.add_argument("--model", default=S, help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default=S, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=S, help="port (default 30000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=S, help="model name clients send (default: from the model path)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=S)
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int, default=S)
    p.add_argument("--page-size", type=int, default=S, help="KV cache tokens per page")
    p.add_argument("--num-pages", type=int, default=S, help="KV cache pages (default: from the memory fraction)")
    p.add_argument("--kv-memory-fraction", "--mem-fraction-static", dest="kv_memory_fraction", type=float, default=S,
                   help="fraction of accelerator memory for the KV cache")
    p.add_argument("--max-running-requests", type=int, default=S)
    p.add_argument("--max-num-batched-tokens", "--chunked-prefill-size", dest="max_num_batched_tokens", type=int,
                   default=S, help="token budget per engine step (chunked prefill)")
    p.add_argument("--max-queued-requests", type=int, default=S, help="waiting requests before answering 503")
    p.add_argument("--attention-backend", choices=["auto", "cpu", "xla", "reference", "pallas"], default=S,
                   help="auto: cpu (our C++ kernel for XLA:CPU; xla, pure JAX, where it cannot be built) on CPU, "
                        "our Pallas kernels on GPU/TPU")
    p.add_argument("--quantization", choices=["auto", "none", "int8"], default=S,
                   help="CPU matmuls: auto (int8 x int8, AVX-512 VNNI or AVX2, for the step sizes where this "
                        "machine runs it faster than float32, measured once and cached), none (float), int8 (always)")
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=S,
                   help="devices one engine's model is split over (tensor parallelism)")
    p.add_argument("--dp-size", "--dp", dest="dp_size", type=int, default=S,
                   help="engine replicas on disjoint groups of tp-size devices, requests routed by load and prefix")
    p.add_argument("--nnodes", type=int, default=S,
                   help="hosts serving one model together (jax.distributed; host 0 serves HTTP, the others follow)")
    p.add_argument("--node-rank", type=int, default=S, help="this host's index in [0, nnodes)")
    p.add_argument("--dist-init-addr", default=S, help="HOST:PORT of host 0's jax.distributed coordinator")
    p.add_argument("--layer-loop", choices=["auto", "scan", "loop"], default=S,
                   help="decoder layers as a Python loop (auto on CPU) or one lax.scan (auto elsewhere)")
    p.add_argument("--compilation-cache-dir", type=_cache_dir_flag, default=S,
                   help="persistent XLA compilation cache: a directory, 'auto' ($JAXSERVE_CACHE/xla, the default) "
                        "or 'none'")
    p.add_argument("--executable-cache-dir", type=_cache_dir_flag, default=S,
                   help="compiled step programs kept across starts: a directory, 'auto' ($JAXSERVE_CACHE/executables, "
                        "the default) or 'none'")
    p.add_argument("--no-background-compile", dest="compile_in_background", action="store_false", default=S,
                   help="compile every bucket before serving (default: serve once the essential programs are "
                        "ready, compile the rest in the background)")
    p.add_argument("--compile-workers", type=int, default=S,
                   help="programs compiled at once before serving (default: the cores, at most 4)")
    p.add_argument("--grammar-capacity-states", type=int, default=S,
                   help="rows of the device pool of constraint mask rows (vocab/8 bytes each)")
    p.add_argument("--grammar-class-map-slots", type=int, default=S,
                   help="grammars whose state advances on the device at once (one vocab-wide int32 row each)")
    p.add_argument("--grammar-next-capacity", type=int, default=S,
                   help="entries of the device next-state tables shared by those grammars (int32 each)")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--api-key", default=S, help="require `Authorization: Bearer KEY` (default: $JAXSERVE_API_KEY)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default=S)
    p.add_argument("--max-request-body-bytes", type=int, default=S)
    p.add_argument("--graceful-shutdown-timeout-s", type=float, default=S,
                   help="on SIGTERM/SIGINT: seconds in-flight requests get to finish before they are answered 503")
    p.add_argument("--request-timeout", "--request-timeout-s", dest="request_timeout_s", type=float, default=S,
                   help="per-request deadline in seconds (default: none); past it the request gets 504")
    p.add_argument("--disable-prefix-cache", dest="enable_prefix_cache", action="store_false", default=S,
                   help="recompute every prompt instead of reusing the KV pages of cached prefixes")
    p.add_argument("--constraint-workers", type=int, default=S,
                   help="threads compiling regex / JSON-schema constraints (their own pool)")
    p.add_argument("--max-pending-constraints", type=int, default=S,
                   help="distinct constraint compiles queued or running before new ones get 503")
    p.add_argument("--disable-constraint-host-matcher", dest="constraint_host_matcher", action="store_false",
                   default=S, help="answer 400 for constraints the device grammar tables cannot hold instead of "
                   "running them on the host matcher (llguidance)")
    p.add_argument("--constraint-device-wait-s", type=float, default=S,
                   help="seconds a request waits for its constraint's device tables before the host matcher takes "
                   "it (the device compile goes on for later requests); default: until the device path answers")
    p.add_argument("--stuck-step-timeout-s", type=float, default=S,
                   help="the engine is declared dead (health 503) when one step runs longer than this")
    return p


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(value: str) -> Path:
    """A YAML path, or the name of a shipped preset (`cpu`, `gpu`, `tpu`: configs/NAME.yaml)."""
    file = Path(value)
    if file.is_file():
        return file
    preset = PRESET_DIR / f"{value}.yaml"
    if "/" not in value and not value.endswith((".yaml", ".yml")) and preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise ValueError(f"config file {value} does not exist" + (f" (presets: {', '.join(presets)})" if presets else ""))


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = resolve_config_path(path)
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = _ALIASES.get(name, name)
        if name not in _ENGINE_FIELDS and name not in _SERVER_FIELDS:
            known = sorted(_ENGINE_FIELDS | _SERVER_FIELDS)
            raise ValueError(f"config file {path}: unknown option {key!r}; known options: {', '.join(known)}")
        out[name] = value
    return out


def parse_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Defaults < YAML file < $JAXSERVE_API_KEY < flags. Raises ValueError for bad values."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    values: dict[str, Any] = _load_yaml(config_path) if config_path else {}
    env = os.environ if environ is None else environ
    if env.get("JAXSERVE_API_KEY"):
        values["api_key"] = env["JAXSERVE_API_KEY"]
    values.update(args)
    engine = EngineConfig(**{k: v for k, v in values.items() if k in _ENGINE_FIELDS})
    server = ServerConfig(engine=engine, **{k: v for k, v in values.items() if k in _SERVER_FIELDS})
    if not 0 <= server.port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {server.port}")
    if server.max_request_body_bytes < 1024:
        raise ValueError("max_request_body_bytes must be at least 1024")
    if server.request_timeout_s is not None and not server.request_timeout_s > 0:
        raise ValueError("request_timeout_s must be > 0")
    if not server.graceful_shutdown_timeout_s >= 0:
        raise ValueError("graceful_shutdown_timeout_s must be >= 0")
    if server.nnodes < 1 or not 0 <= server.node_rank < server.nnodes:
        raise ValueError(f"need nnodes >= 1 and 0 <= node_rank < nnodes (got {server.nnodes}, {server.node_rank})")
    if server.nnodes > 1 and not server.dist_init_addr:
        raise ValueError("--dist-init-addr HOST:PORT (host 0's address) is required with --nnodes > 1")
    if server.nnodes > 1 and engine.dp_size > 1:
        raise ValueError("data parallelism across hosts is not supported: use --dp-size 1 with --nnodes > 1")
    return server


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn with a drain before its own shutdown: stop accepting, let the engine's requests finish
        within the grace period, answer the rest with 503 (their handlers send it), then close."""

        state: "ServerState"
        grace_s: float

        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()  # no new connections; requests on kept-alive ones are answered 503
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.grace_s
            engine = self.state.engine
            if engine is not None:
                engine.draining = True
                while engine.num_active and loop.time() < deadline and not self.force_exit:
                    await asyncio.sleep(0.05)
                if engine.num_active:
                    logger.warning("graceful shutdown: %d request(s) unfinished after %.0f s; answering them 503",
                                   engine.num_active, self.grace_s)
                    engine.fail_all("the server is shutting down (its graceful shutdown period ran out)")
            # Let the handlers send those answers before uvicorn cancels whatever is left.
            self.config.timeout_graceful_shutdown = max(deadline - loop.time(), 0.0) + 5.0
            await super().shutdown(sockets)

    return DrainingServer


async def serve(config: ServerConfig) -> int:
    import uvicorn

    from jaxserve.server.app import build_app

    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None
    channel = None  # multi-host: host 0 publishes its device operations to the other hosts
    from jaxserve.startup import StartupProgress, freeze_startup_heap

    progress = StartupProgress(on_status=lambda text: setattr(app.state.jaxserve, "startup_progress", text))

    async def load_engine():
        from jaxserve.engine.async_engine import AsyncEngine
        from jaxserve.engine.data_parallel import DataParallelEngine

        t0 = time.perf_counter()
        nonlocal channel
        progress.phase(f"loading the model {config.engine.model or '(embedded default: SmolLM2-135M-Instruct)'}")
        make = DataParallelEngine.from_config if config.engine.dp_size > 1 else AsyncEngine.from_config
        engine = await asyncio.to_thread(make, config.engine)
        if config.nnodes > 1:
            from jaxserve.engine.multihost import OpChannel, lead

            channel = OpChannel()
            lead(engine.engine, channel)
        t1 = time.perf_counter()
        progress.phase(f"model loaded in {t1 - t0:.1f} s; preparing the programs a first request needs")
        await engine.start(progress)
        freeze_startup_heap()
        programs = engine.program_sets
        background = sum(p.background_running for p in programs)
        progress.phase(
            f"ready in {time.perf_counter() - t0:.1f} s: {sum(len(p) for p in programs)} programs "
            f"({sum(p.num_compiled for p in programs)} compiled, {sum(p.num_loaded for p in programs)} loaded from the "
            f"executable cache)" + ("; the other buckets compile in the background" if background else ""))
        return engine

    async def on_ready() -> None:
        while server is not None and not server.started and not server.should_exit:
            await asyncio.sleep(0.02)
        shown = f"[{host}]" if ":" in host else host
        name = config.served_model_name or app.state.jaxserve.served_model_name
        print(f"jaxserve: serving {name!r} at http://{shown}:{port}/v1 (Ctrl-C to stop)", flush=True)

    def on_failure(exc: BaseException) -> None:
        failures.append(exc)
        print(f"jaxserve: the engine failed to start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    app = build_app(config, load_engine, on_ready=on_ready, on_startup_failure=on_failure)
    uv_config = uvicorn.Config(
        app,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.graceful_shutdown_timeout_s,
        access_log=config.log_level == "debug",
        lifespan="on",
    )
    server = draining_server_class()(uv_config)
    server.state = app.state.jaxserve
    server.grace_s = config.graceful_shutdown_timeout_s
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler turns that into exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    await server.serve(sockets=[sock])
    if channel is not None:
        channel.publish("stop")  # the engine thread has stopped: the other hosts may exit
    code = 1 if failures else 0
    engine = app.state.jaxserve.engine
    if engine is not None and any(p.background_running for p in engine.program_sets):
        # A compile still running past the shutdown's grace: leave without unwinding XLA under it.
        print("jaxserve: exiting with a background compile unfinished", file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    if not app.state.jaxserve.ready and not failures:
        # Stopped during warm-up: XLA compilation in the loader thread cannot be interrupted, and asyncio
        # would wait for that thread before returning. Nothing is in flight, so leave right away.
        print("jaxserve: stopped during start-up", file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def follow_host0(config: ServerConfig) -> int:
    """A host other than host 0: build the same engine (this host's shards) and replay host 0's device
    operations until it stops."""
    from jaxserve.engine.engine import LLMEngine
    from jaxserve.engine.multihost import OpChannel, follow

    engine = LLMEngine(config.engine)
    engine.warmup()  # every program host 0 may launch, before following it
    print(f"jaxserve: host {config.node_rank} of {config.nnodes} ready, following host 0", flush=True)
    follow(engine, OpChannel())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ValueError as exc:
        print(f"jaxserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if config.nnodes > 1:
            from jaxserve.engine.multihost import initialize

            initialize(config.dist_init_addr or "", config.nnodes, config.node_rank)
            if config.node_rank > 0:
                return follow_host0(config)
        return asyncio.run(serve(config))
    except ValueError as exc:
        print(f"jaxserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
