"""The runner's compiled programs: built once per shape bucket, kept on disk, some compiled in the background.

- `ExecutableCache`: serialized compiled executables (`jax.experimental.serialize_executable`) on disk, keyed by
  everything that shapes them: jax/jaxlib versions, the backend and devices, a fingerprint of jaxserve's own
  source, the model and engine configuration, the program and its argument shapes, dtypes and shardings.
  A warm start loads them without tracing or lowering anything; a corrupt or unreadable entry is logged,
  deleted and rebuilt.
- `ProgramSet`: the ready executables by (kind, shape). Serving only ever calls a ready one; `start_background`
  compiles the rest on a thread of its own while the engine serves with the ones it has (the runner picks
  the cheapest ready bucket that holds a step; `version` changes whenever one becomes ready).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 4 << 30
_SOURCE_ROOTS = (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2] / "pallas_kernels")


def code_fingerprint() -> str:
    """A hash of jaxserve's and the kernels' source: any code change invalidates every cached executable."""
    h = hashlib.sha256()
    for root in _SOURCE_ROOTS:
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _describe(x: Any) -> str:
    sharding = getattr(x, "sharding", None)
    where = ""
    if sharding is not None:
        spec = getattr(sharding, "spec", None)
        ids = [d.id for d in sharding.device_set]
        where = f"@{spec}:{sorted(ids)}"
    return f"{tuple(x.shape)}:{x.dtype}{where}"


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs of `tree` (device arrays keep their sharding; host arrays are uncommitted)."""
    def one(x: Any) -> jax.ShapeDtypeStruct:
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class ExecutableCache:
    """Compiled executables serialized under `directory` (None: nothing is kept)."""

    def __init__(self, directory: Path | None, context: str, devices: list) -> None:
        """devices: where the programs run (an engine's mesh), in mesh order; part of the key."""
        import jaxlib

        self.directory = directory
        self.devices = list(devices)
        first = self.devices[0]
        self._context = "|".join([jax.__version__, jaxlib.__version__, first.platform, first.device_kind,
                                  repr([d.id for d in self.devices]), code_fingerprint(), context])
        self.rebuilt = 0  # entries found unusable and compiled again
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._prune()

    def _prune(self) -> None:
        """Keep the cache under MAX_CACHE_BYTES: the least recently used entries go first (a load touches its
        entry). Entries of older code or other models are never hit again and age out this way."""
        try:
            entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.directory.glob("*.exe")]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= MAX_CACHE_BYTES:
                break
            path.unlink(missing_ok=True)
            total -= size

    def key(self, name: str, static: Any, args: Any) -> str:
        leaves, treedef = jax.tree.flatten(args)
        text = "|".join([self._context, name, repr(static), str(treedef), *(_describe(x) for x in leaves)])
        return hashlib.sha256(text.encode()).hexdigest()

    def _use_path(self) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"use-{hashlib.sha256(self._context.encode()).hexdigest()[:16]}.json"

    def read_use(self) -> dict[str, int]:
        """Steps per bucket recorded by earlier runs of this exact engine shape (empty when none)."""
        path = self._use_path()
        try:
            data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}  # an unreadable record only costs the ordering

    def add_use(self, counts: dict[str, int]) -> None:
        path = self._use_path()
        if path is None or not counts:
            return
        merged = self.read_use()
        for k, v in counts.items():
            merged[k] = merged.get(k, 0) + v
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot record bucket use in %s: %s", path, e)

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.exe"

    def load(self, key: str) -> Any | None:
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = deserialize_and_load(payload, in_tree, out_tree, execution_devices=self.devices)
        except Exception as e:  # a corrupt, truncated or incompatible entry: rebuild it, never fail the start
            log.warning("executable cache entry %s is unusable (%s: %s); compiling it again", path.name,
                        type(e).__name__, str(e)[:200])
            self.rebuilt += 1
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: kept by `_prune`
        except OSError:
            pass
        return compiled

    def store(self, key: str, compiled: Any) -> None:
        if self.directory is None:
            return
        from jax.experimental.serialize_executable import serialize

        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_bytes(pickle.dumps(serialize(compiled), protocol=5))
            os.replace(tmp, path)  # atomic: a reader sees the old entry or the whole new one
        except Exception as e:  # a full disk or an unserializable program costs a recompile next time only
            log.warning("cannot store executable %s: %s: %s", path.name, type(e).__name__, str(e)[:200])
            tmp.unlink(missing_ok=True)


def _takes(compiled: Any, args: tuple) -> bool:
    """Whether a loaded executable takes exactly these (abstract) dynamic arguments."""
    try:
        (info, _kwargs) = compiled.args_info
        got = [(tuple(a.shape), a.dtype) for a in jax.tree.leaves(info)]
    except Exception:
        return False
    return got == [(tuple(x.shape), x.dtype) for x in jax.tree.leaves(args)]


@dataclass(frozen=True)
class ProgramSpec:
    """One program to build: `jitted.lower(*static, *args)` (args abstract), called as `compiled(*dynamic)`."""

    kind: str  # "forward" | "sample" | "copy_pages" | "fork_slots"
    shape: tuple[int, ...]
    jitted: Any
    static: tuple
    args: tuple
    variant: str = ""  # another program for the same shape (the forward's int8 matmuls): its own cache entry


@dataclass(frozen=True)
class BuildEvent:
    spec: ProgramSpec
    seconds: float
    loaded: bool  # from the executable cache (else compiled)
    index: int  # 1-based among the programs of this phase
    total: int
    background: bool


class ProgramSet:
    def __init__(self, cache: ExecutableCache) -> None:
        self.cache = cache
        self._ready: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped whenever a program becomes ready
        self.num_compiled = self.num_loaded = 0
        self.compiled_while_serving = 0
        self._background: threading.Thread | None = None
        self._stop = threading.Event()
        self.background_error: BaseException | None = None

    def get(self, kind: str, shape: tuple[int, ...]) -> Any | None:
        return self._ready.get((kind, shape))

    def ready_shapes(self, kind: str) -> list[tuple[int, ...]]:
        return [shape for k, shape in list(self._ready) if k == kind]

    def __len__(self) -> int:
        return len(self._ready)

    def build(self, spec: ProgramSpec) -> tuple[Any, bool, float]:
        """Load or compile one program and make it ready; returns (executable, loaded, seconds)."""
        existing = self.get(spec.kind, spec.shape)
        if existing is not None:
            return existing, True, 0.0
        t0 = time.perf_counter()
        key = self.cache.key(f"{spec.kind}{spec.shape}{spec.variant}", spec.static, spec.args)
        compiled = self.cache.load(key)
        if compiled is not None and not _takes(compiled, spec.args):
            log.warning("executable cache entry for %s %s takes other arguments (stale); compiling it again",
                        spec.kind, spec.shape)
            self.cache.rebuilt += 1
            compiled = None
        loaded = compiled is not None
        if compiled is None:
            compiled = spec.jitted.lower(*spec.static, *spec.args).compile()
            self.cache.store(key, compiled)
        with self._lock:
            self._ready[(spec.kind, spec.shape)] = compiled
            self.version += 1
            if loaded:
                self.num_loaded += 1
            else:
                self.num_compiled += 1
        return compiled, loaded, time.perf_counter() - t0

    def build_all(self, specs: list[ProgramSpec], progress: Callable[[BuildEvent], None] | None = None,
                  background: bool = False, workers: int = 1) -> None:
        """Build `specs`, `workers` at a time (XLA compiles outside the GIL, so on a backend that compiles
        one program per thread the cores share the work); progress is reported in completion order."""
        done = 0
        lock = threading.Lock()

        def one(spec: ProgramSpec) -> None:
            nonlocal done
            if self._stop.is_set():
                return
            _, loaded, seconds = self.build(spec)
            with lock:
                done += 1
                if progress is not None:
                    progress(BuildEvent(spec, seconds, loaded, done, len(specs), background))

        if workers <= 1 or len(specs) <= 1:
            for spec in specs:
                one(spec)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxserve-compile") as pool:
            for future in [pool.submit(one, spec) for spec in specs]:
                future.result()  # the first failure propagates

    def start_background(self, specs: Iterable[ProgramSpec], progress: Callable[[BuildEvent], None] | None = None,
                         workers: int = 1) -> None:
        """Build `specs` in order on threads of their own (the engine serves with what is ready meanwhile)."""
        todo = [s for s in specs if self.get(s.kind, s.shape) is None]
        if not todo:
            return

        def run() -> None:
            try:
                self.build_all(todo, progress, background=True, workers=workers)
            except BaseException as e:  # serving goes on with the ready programs; say why the rest are missing
                self.background_error = e
                log.error("background compilation stopped: %s: %s", type(e).__name__, e)

        self._background = threading.Thread(target=run, name="jaxserve-compile", daemon=True)
        self._background.start()

    @property
    def background_running(self) -> bool:
        return self._background is not None and self._background.is_alive()

    def wait_background(self, timeout: float | None = None) -> bool:
        if self._background is not None:
            self._background.join(timeout)
        return not self.background_running

    def stop_background(self) -> None:
        self._stop.set()
