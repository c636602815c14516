"""Data parallelism: `dp_size` engine replicas on disjoint device groups behind one server.

Each replica is a whole engine (its own weights, KV cache, scheduler and thread) on `tp_size` devices of its
own; `DataParallelEngine` has the `AsyncEngine` interface the server uses and routes each request to one
replica:
- by prefix affinity first: prompts whose first pages were last sent to a replica go there again (its prefix
  cache probably holds them), unless that replica is clearly busier than the least loaded one;
- otherwise by load: requests admitted and unfinished, then the fewest KV pages in use.
The affinity table is the router's own record of where page-aligned prompt prefixes went (SGLang's router
keeps the same kind of approximate tree); it never reads a replica's cache from outside its thread.
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import OrderedDict
from typing import AsyncIterator

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import EngineStats
from jaxserve.engine.errors import EngineBusy, EngineDead
from jaxserve.engine.request import RequestOutput
from jaxserve.sampling.params import SamplingParams
from jaxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

AFFINITY_PAGES = 8  # prefixes of up to this many whole pages are remembered
AFFINITY_ENTRIES = 65536


def replica_device_groups(dp_size: int, tp_size: int, devices: list) -> list[list]:
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    need = dp_size * tp_size
    if len(devices) < need:
        raise ValueError(f"dp_size {dp_size} x tp_size {tp_size} needs {need} devices; {len(devices)} available")
    return [devices[i * tp_size:(i + 1) * tp_size] for i in range(dp_size)]


class DataParallelEngine:
    """Several `AsyncEngine` replicas as one: the interface the server uses, plus routing."""

    def __init__(self, replicas: list[AsyncEngine], page_size: int) -> None:
        if not replicas:
            raise ValueError("a data-parallel engine needs at least one replica")
        self.replicas = replicas
        self.page_size = page_size
        self._owner: dict[str, AsyncEngine] = {}  # request id -> its replica
        self._affinity: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica index (LRU)
        self.routed = [0] * len(replicas)  # requests sent to each replica
        self.routed_by_affinity = 0

    @classmethod
    def from_config(cls, config: EngineConfig, devices: list | None = None) -> "DataParallelEngine":
        import jax

        from jaxserve.engine.engine import LLMEngine

        groups = replica_device_groups(config.dp_size, config.tp_size, list(jax.devices() if devices is None else devices))
        replicas = []
        for i, group in enumerate(groups):
            log.info("data-parallel replica %d of %d on %s", i + 1, len(groups), [str(d) for d in group])
            replicas.append(AsyncEngine(LLMEngine(config, devices=group)))
        return cls(replicas, config.page_size)

    # -- what the server reads ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.replicas[0].tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.replicas[0].model_config

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def model_name(self) -> str:
        return self.replicas[0].model_name

    @property
    def ready(self) -> bool:
        return all(r.ready for r in self.replicas)

    @property
    def dead_reason(self) -> str | None:
        """One dead replica makes the server unhealthy: its share of the load would go unanswered otherwise."""
        for i, r in enumerate(self.replicas):
            if r.dead_reason is not None:
                return f"data-parallel replica {i}: {r.dead_reason}"
        return None

    @property
    def draining(self) -> bool:
        return any(r.draining for r in self.replicas)

    @draining.setter
    def draining(self, value: bool) -> None:
        for r in self.replicas:
            r.draining = value

    @property
    def num_active(self) -> int:
        return sum(r.num_active for r in self.replicas)

    @property
    def num_queued(self) -> int:
        return sum(r.num_queued for r in self.replicas)

    @property
    def program_sets(self) -> list:
        return [p for r in self.replicas for p in r.program_sets]

    def stats(self) -> EngineStats:
        """Every counter summed over the replicas."""
        parts = [r.stats() for r in self.replicas]
        return EngineStats(**{f.name: sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(EngineStats)})

    def check_admission(self) -> None:
        reason = self.dead_reason
        if reason is not None:
            raise EngineDead(reason)
        errors = []
        for r in self.replicas:
            try:
                r.check_admission()
                return
            except EngineBusy as e:
                errors.append(e)
        raise errors[0]

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self, progress=None) -> None:
        for r in self.replicas:  # one at a time: compiling is CPU-bound, replicas would only contend
            await r.start(progress)

    async def shutdown(self) -> None:
        for r in self.replicas:
            await r.shutdown()

    def fail_all(self, reason: str) -> None:
        for r in self.replicas:
            r.fail_all(reason)

    async def flush_prefix_cache(self) -> int:
        total = 0
        for r in self.replicas:
            total += await r.flush_prefix_cache()
        self._affinity.clear()
        return total

    def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            owner.abort(request_id)

    # -- routing --------------------------------------------------------------------------------------
    def _prefix_keys(self, prompt_ids: list[int], salt: str | None) -> list[int]:
        """Hashes of the prompt's first 1..AFFINITY_PAGES whole pages (the prefix cache's unit), longest last."""
        pages = min(len(prompt_ids) // self.page_size, AFFINITY_PAGES)
        return [hash((salt, tuple(prompt_ids[:n * self.page_size]))) for n in range(1, pages + 1)]

    def _load(self, i: int) -> tuple[int, int]:
        r = self.replicas[i]
        return r.num_active, r.engine.allocator.num_used

    def choose(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """The replica for a new request (never a dead or draining one while another can take it)."""
        alive = [i for i, r in enumerate(self.replicas) if r.dead_reason is None and not r.draining]
        if not alive:
            return 0
        least = min(alive, key=self._load)
        keys = self._prefix_keys(prompt_ids, params.cache_salt)
        for key in reversed(keys):
            i = self._affinity.get(key)
            if i is None or i not in alive:
                continue
            # Follow the cached prefix unless that replica has clearly more work than the least loaded one.
            if self.replicas[i].num_active <= self.replicas[least].num_active + max(2, self.replicas[least].num_active // 4):
                self.routed_by_affinity += 1
                least = i
            break
        for key in keys:
            self._affinity[key] = least
            self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return least

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        self.check_admission()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._owner:
            raise ValueError(f"duplicate request id {request_id!r}")
        i = self.choose(prompt_ids, params)
        replica = self.replicas[i]
        self._owner[request_id] = replica
        self.routed[i] += 1
        try:
            async for out in replica.generate(prompt_ids, params, request_id):
                yield out
        finally:
            self._owner.pop(request_id, None)
