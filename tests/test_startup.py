"""Start-up: executables kept across starts (a corrupt or stale entry is rebuilt, never a failed start), and
progress shown while starting (a bar on a terminal, log lines otherwise, the same text on /health)."""
from __future__ import annotations

import io
import logging

import pytest

from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.offline import LLM
from jaxserve.sampling.params import SamplingParams
from jaxserve.startup import StartupProgress

SMALL = dict(max_running_requests=2, max_num_batched_tokens=16, max_model_len=64, page_size=16, num_pages=16)
PROMPT = [5, 6, 7, 8, 9, 10]


def _answer(engine: LLMEngine) -> list[int]:
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=4, temperature=0.0))
    tokens = []
    while engine.has_work():
        for out in engine.step():
            tokens += [t for c in out.outputs for t in c.token_ids]
    return tokens


@pytest.fixture()
def small_engine(tiny_model_dir, tmp_path):
    from jaxserve.config import EngineConfig

    def make() -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), executable_cache_dir=str(tmp_path / "exe"),
                                      **SMALL))

    return make


def test_warm_start_loads_every_program_without_compiling(small_engine, tmp_path):
    first = small_engine()
    first.warmup()
    expected = _answer(first)
    n = len(first.runner.programs)
    assert first.runner.programs.num_compiled == n and n == len(list((tmp_path / "exe").glob("*.exe")))
    second = small_engine()
    second.warmup()
    assert (second.runner.programs.num_loaded, second.runner.programs.num_compiled) == (n, 0)
    assert _answer(second) == expected


def test_corrupt_and_stale_entries_are_rebuilt(small_engine, tmp_path, caplog):
    first = small_engine()
    first.warmup()
    expected = _answer(first)
    entries = sorted((tmp_path / "exe").glob("*.exe"), key=lambda p: p.stat().st_size)
    entries[0].write_bytes(b"\x80\x05not a pickle")  # corrupt
    entries[-1].write_bytes(entries[-2].read_bytes())  # stale: a valid executable of another program
    with caplog.at_level(logging.WARNING, logger="jaxserve.engine.programs"):
        second = small_engine()
        second.warmup()
    programs = second.runner.programs
    assert programs.num_compiled == 2 and programs.cache.rebuilt == 2
    assert "unusable" in caplog.text and "stale" in caplog.text
    assert _answer(second) == expected
    third = small_engine()  # the rebuilt entries were stored again
    third.warmup()
    assert third.runner.programs.num_compiled == 0


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(small_engine, caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    engine = small_engine()
    statuses: list[str] = []
    tty = Terminal()
    engine.warmup(StartupProgress(stream=tty, on_status=statuses.append))
    total = len(engine.runner.programs)
    assert f"] {total}/{total} " in tty.getvalue() and "\r  [" in tty.getvalue() and "ETA" in tty.getvalue()
    assert statuses[-1].startswith(f"preparing programs {total}/{total}")

    plain = io.StringIO()
    again = small_engine()
    with caplog.at_level(logging.INFO, logger="jaxserve.startup"):
        again.warmup(StartupProgress(stream=plain))
    assert plain.getvalue() == ""  # not a terminal: log lines only
    assert f"program {total}/{total}: " in caplog.text and "loaded" in caplog.text


def test_health_says_what_the_start_is_doing():
    from jaxserve.config import ServerConfig
    from jaxserve.server.errors import APIError
    from jaxserve.server.state import ServerState

    state = ServerState(ServerConfig())
    state.startup_progress = "preparing programs 3/5: forward (16, 1, 128) compiled in 4.0 s (ETA 8 s)"
    with pytest.raises(APIError) as err:
        state.require_engine()
    assert err.value.status_code == 503 and "preparing programs 3/5" in err.value.message


def test_offline_llm_still_compiles_everything_up_front(tiny_model_dir, tmp_path):
    llm = LLM(str(tiny_model_dir("llama")), warmup=True, executable_cache_dir=str(tmp_path), **SMALL)
    assert not llm.engine.runner.programs.background_running
    assert len(llm.engine.runner.programs) == len(llm.engine.runner.program_specs())


def test_background_compiles_follow_recorded_traffic_and_drop_unused_buckets(small_engine):
    first = small_engine()
    first.warmup()
    specs = first.runner.program_specs()
    rest = specs[first.runner.essential_count:]
    forward = [s for s in rest if s.kind == "forward"]
    assert first.runner._by_recorded_use(rest) == rest  # no record yet: smallest first
    busy, idle = forward[-1].shape, forward[0].shape
    first.runner.bucket_use = {busy: 2500, idle: 0}
    first.runner.save_bucket_use()
    second = small_engine()
    ordered = second.runner._by_recorded_use(second.runner.program_specs()[second.runner.essential_count:])
    assert [s.shape for s in ordered if s.kind == "forward"] == [busy]  # the never-used ones are dropped
    assert all(s.kind != "forward" for s in ordered[:-1])  # samplers first


def test_sigterm_while_buckets_compile_in_the_background_exits_cleanly(tiny_model_dir, tmp_path):
    """Stopping right after "serving at" (the other buckets still compiling on their thread) lets the compile in
    flight finish and exits 0; a process leaving while XLA compiles on another thread aborted in C++."""
    import time

    from test_server_e2e import ServerProcess, launch_args

    server = ServerProcess(launch_args(tiny_model_dir("llama"), "--executable-cache-dir", str(tmp_path / "exe"),
                                       "--log-level", "info"), tmp_path / "server.log")
    deadline = time.monotonic() + 300
    while not server.ready and server.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.ready, (tmp_path / "server.log").read_text()[-3000:]
    assert server.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]
    log = (tmp_path / "server.log").read_text()
    assert "compile in the background" in log and "terminate called" not in log


def test_startup_heap_is_frozen_out_of_the_collector():
    import gc

    from jaxserve.startup import freeze_startup_heap

    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > max(before, 1000)  # the test process's modules at least
        assert gc.isenabled()  # later garbage is still collected
    finally:
        gc.unfreeze()
