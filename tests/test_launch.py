"""`python -m jaxserve.launch`: flag/YAML parsing and start-up errors. The process life cycle (503 while
warming up, the ready line, graceful SIGTERM with a request in flight, exit 0) is tested in
test_server_e2e.py, on the one server that module starts."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.launch import main, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults():
    cfg = parse_config([], environ={})
    assert (cfg.host, cfg.port, cfg.api_key, cfg.engine.model) == ("127.0.0.1", 30000, None, None)


def test_flags_override_yaml_and_aliases(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("port: 1234\npage-size: 32\nmax_running_requests: 8\nchunked_prefill_size: 128\nlog_level: debug\n")
    cfg = parse_config(["--config", str(preset), "--port", "4321", "--mem-fraction-static", "0.7",
                        "--served-model-name", "m", "--tp", "2", "--api-key", "k"], environ={})
    assert cfg.port == 4321 and cfg.engine.page_size == 32 and cfg.engine.max_running_requests == 8
    assert cfg.engine.max_num_batched_tokens == 128 and cfg.engine.kv_memory_fraction == 0.7
    assert (cfg.served_model_name, cfg.engine.tp_size, cfg.api_key, cfg.log_level) == ("m", 2, "k", "debug")


def test_engine_flags_for_compilation_cache_layer_loop_and_grammar_pool():
    cfg = parse_config(["--compilation-cache-dir", "none", "--layer-loop", "scan", "--grammar-capacity-states", "4096",
                        "--grammar-class-map-slots", "8", "--grammar-next-capacity", "65536"], environ={}).engine
    assert (cfg.compilation_cache_dir, cfg.layer_loop) == (None, "scan")
    assert (cfg.grammar_capacity_states, cfg.grammar_class_map_slots, cfg.grammar_next_capacity) == (4096, 8, 65536)
    assert parse_config(["--compilation-cache-dir", "/tmp/x"], environ={}).engine.compilation_cache_dir == "/tmp/x"
    assert parse_config([], environ={}).engine.compilation_cache_dir == "auto"
    with pytest.raises(ValueError, match="grammar_class_map_slots"):
        parse_config(["--grammar-class-map-slots", "-1"], environ={})


def test_api_key_from_environment_and_flag_wins():
    assert parse_config([], environ={"JAXSERVE_API_KEY": "env"}).api_key == "env"
    assert parse_config(["--api-key", "flag"], environ={"JAXSERVE_API_KEY": "env"}).api_key == "flag"


@pytest.mark.parametrize("name", ["cpu", "gpu", "tpu"])
def test_shipped_presets_parse_by_path_and_by_name(name):
    by_path = parse_config(["--config", str(REPO / "configs" / f"{name}.yaml")], environ={})
    assert by_path.port == 30000
    assert parse_config(["--config", name], environ={}) == by_path


def test_bad_configuration_is_reported_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_runing_requests: 4\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown option 'max_runing_requests'" in capsys.readouterr().err
    assert main(["--page-size", "7"]) == 2
    assert "page_size" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--config", "nosuchpreset"]) == 2
    assert "presets: cpu, gpu, tpu" in capsys.readouterr().err


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "jaxserve.launch", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
