"""Multi-host serving: one engine whose devices span several processes (hosts), in JAX's multi-controller model.

`jax.distributed.initialize` joins the processes (`--nnodes`, `--node-rank`, `--dist-init-addr`); the mesh of
an engine then holds devices of every host, and every host must launch the same jitted programs in the same
order with the same host inputs. Host 0 runs the HTTP server and the scheduler (the whole `LLMEngine`); each
other host builds the same engine (its own shards of the weights, the KV cache and the grammar tables) and
*follows*: host 0 publishes every device operation it launches (a step's host arrays, the page copies and
slot forks, the grammar-table writes) through the distributed runtime's key-value store, and the followers
replay them. Nothing else crosses hosts but XLA's own collectives inside the programs.

The key-value store is the coordination service `jax.distributed` starts (the client JAX keeps in
`jax._src.distributed.global_state`); there is no public accessor for it in JAX 0.10/0.11.
"""
from __future__ import annotations

import logging
import pickle
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

_PREFIX = "jaxserve/ops/"
# Host 0 cannot run more than a few device operations ahead of the followers (every step's collectives wait
# for all hosts, and host 0 reads each step's result), so published operations older than this are deleted.
_KEEP = 4096
_POLL_MS = 60_000


def initialize(dist_init_addr: str, nnodes: int, node_rank: int, *, timeout_s: int = 300) -> None:
    """Join the `nnodes` processes of one server (before anything uses a JAX backend)."""
    import jax

    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"need nnodes >= 1 and 0 <= node_rank < nnodes (got nnodes={nnodes}, node_rank={node_rank})")
    if nnodes > 1 and not dist_init_addr:
        raise ValueError("--dist-init-addr HOST:PORT (host 0's address) is required with --nnodes > 1")
    if nnodes == 1:
        return
    jax.distributed.initialize(coordinator_address=dist_init_addr, num_processes=nnodes, process_id=node_rank,
                               initialization_timeout=timeout_s)
    log.info("host %d of %d joined at %s: %d local devices, %d in all", node_rank, nnodes, dist_init_addr,
             jax.local_device_count(), jax.device_count())


def _client() -> Any:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized (multi-host serving needs --nnodes > 1)")
    return client


class OpChannel:
    """Host 0 publishes device operations in order; followers receive them in the same order."""

    def __init__(self) -> None:
        self._client = _client()
        self._next = 0

    def publish(self, op: str, *args: Any) -> None:
        self._client.key_value_set_bytes(f"{_PREFIX}{self._next}", pickle.dumps((op, args), protocol=5))
        if self._next >= _KEEP:
            self._client.key_value_delete(f"{_PREFIX}{self._next - _KEEP}")
        self._next += 1

    def receive(self) -> tuple[str, tuple]:
        key = f"{_PREFIX}{self._next}"
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except Exception as e:  # a timeout while host 0 is idle: keep waiting; anything else is fatal
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self._next += 1
        return pickle.loads(data)


def lead(engine: Any, channel: OpChannel) -> None:
    """Make host 0's engine publish every device operation it launches."""
    engine.runner.mirror = channel.publish
    engine.grammar_pool.mirror = channel.publish


def follow(engine: Any, channel: OpChannel, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Replay host 0's device operations on this host's shards until host 0 says stop; returns the count."""
    runner, pool = engine.runner, engine.grammar_pool
    handlers = {
        "run": lambda inp: runner.run_mirrored(inp),
        "forks": lambda copies, slot_forks: runner.apply_forks(copies, slot_forks),
        "grammar": lambda name, args: pool.apply_write(name, *args),
    }
    count = 0
    t0 = time.perf_counter()
    while not should_stop():
        op, args = channel.receive()
        if op == "stop":
            log.info("host 0 stopped: %d device operations followed in %.0f s", count, time.perf_counter() - t0)
            return count
        handler = handlers.get(op)
        if handler is None:
            raise RuntimeError(f"unknown operation {op!r} from host 0 (mismatched jaxserve versions?)")
        handler(*args)
        count += 1
    return count
