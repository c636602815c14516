"""JSONSchemaBench through the engine: for every schema that compiles, one sample from the tiny random model
(temperature 1, so the constraint does all the work) must validate with `jsonschema`. Prints a JSON line last.

    python benchmarks/jsonschemabench_engine.py [--data DIR] [--start K] [--limit N] [--max-tokens 384] [--path host]

Outputs ended by `stop` are validated (formats asserted); host-path outputs that ran out of tokens are
counted apart (not_stopped_by_path), as are requests the engine failed.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import tempfile
import time

import jsonschema

from jaxserve.config import EngineConfig
from jaxserve.constrained.host_matcher import HostGrammar
from jaxserve.engine.engine import LLMEngine
from jaxserve.models.default import default_model_path
from jaxserve.models.testing import make_tiny_model
from jaxserve.sampling.params import Constraint, SamplingParams

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--start", type=int, default=0, help="skip the first K schemas of each subset (sorted by name)")
    ap.add_argument("--limit", type=int, default=0, help="schemas per subset after --start (0: all)")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--names-file", default=None, help="only the files listed (SUBSET/NAME.json, one a line)")
    ap.add_argument("--path", choices=["all", "device", "host"], default="all",
                    help="only the schemas that compile to this path (host: the llguidance matcher)")
    args = ap.parse_args()
    wanted = set(pathlib.Path(args.names_file).read_text().split()) if args.names_file else set()

    model_dir = make_tiny_model(tempfile.mkdtemp(prefix="tiny-"), "llama", tokenizer_dir=default_model_path())
    engine = LLMEngine(EngineConfig(model=str(model_dir), max_running_requests=args.max_running,
                                    max_num_batched_tokens=512, max_model_len=args.max_tokens + 64,
                                    grammar_capacity_states=65536))
    engine.warmup()
    summary = {}
    for subset in sorted(p for p in pathlib.Path(args.data).iterdir() if p.is_dir()):
        files = sorted(subset.glob("*.json"))
        if args.names_file:
            files = [f for f in files if f"{subset.name}/{f.name}" in wanted]
        files = files[args.start:][: args.limit or None]
        t0 = time.perf_counter()
        reasons: collections.Counter = collections.Counter()
        schemas: dict[str, dict] = {}
        paths: dict[str, str] = {}
        errors: dict[str, str] = {}
        queue: list[tuple[str, Constraint]] = []
        for f in files:
            try:
                schema = json.loads(f.read_text())
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except (json.JSONDecodeError, jsonschema.SchemaError):
                reasons["invalid schema"] += 1
                continue
            constraint = Constraint("json_schema", json.dumps(schema))
            try:
                grammar = engine.compile_constraint(constraint)
            except ValueError as e:
                reasons[str(e)[:50]] += 1
                continue
            path = "host" if isinstance(grammar, HostGrammar) else "device"
            if args.path not in ("all", path):
                continue
            paths[f.name] = path
            schemas[f.name] = schema
            queue.append((f.name, constraint))
        texts = {name: "" for name, _ in queue}
        finish: dict[str, str | None] = {}
        pending = list(queue)
        while pending or engine.has_work():
            while pending and len(engine.scheduler.running) + len(engine.scheduler.waiting) < args.max_running:
                name, constraint = pending[0]
                try:
                    engine.add_request(name, [1, 2, 3], SamplingParams(temperature=1.0, seed=len(texts),
                                       max_tokens=args.max_tokens, constraint=constraint),
                                       engine.compile_constraint(constraint))
                except ValueError as e:
                    if "pool full" not in str(e) or not engine.has_work():
                        raise
                    break  # wait for running grammars to finish and free pool rows
                pending.pop(0)
            for out in engine.step():
                if out.error:
                    errors[out.request_id] = out.error
                for c in out.outputs:
                    texts[out.request_id] += c.text
                    if c.finish_reason:
                        finish[out.request_id] = c.finish_reason
        invalid, not_stopped = [], []
        for name, schema in schemas.items():
            if name in errors:
                continue
            if finish.get(name) != "stop":
                # Only the host path can run out of tokens (its closing rows steer, they cannot promise).
                not_stopped.append(name)
                continue
            try:
                validator = jsonschema.validators.validator_for(schema)
                validator(schema, format_checker=validator.FORMAT_CHECKER).validate(json.loads(texts[name]))
            except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                invalid.append((name, str(e)[:80]))
        summary[subset.name] = {
            "total": len(files), "compiled": len(schemas), "coverage": round(len(schemas) / max(len(files), 1), 4),
            "device": sum(p == "device" for p in paths.values()), "host": sum(p == "host" for p in paths.values()),
            "failed_requests": len(errors), "failed_examples": list(errors.items())[:3],
            "not_stopped_by_path": dict(collections.Counter(paths[n] for n in not_stopped)),
            "invalid_outputs": len(invalid), "not_finished_with_stop": len(not_stopped),
            "seconds": round(time.perf_counter() - t0, 1), "reasons": dict(reasons.most_common(8)),
            "invalid_examples": invalid[:5],
        }
        print(f"{subset.name}: {len(schemas)}/{len(files)} compiled, {len(invalid)} invalid outputs, "
              f"{len(not_stopped)} not stopped, {summary[subset.name]['seconds']} s", flush=True)
    print(json.dumps({"bench": "jsonschemabench_engine", "model": "tiny random llama (SmolLM2 vocabulary)",
                      "max_tokens": args.max_tokens, "subsets": summary}))


if __name__ == "__main__":
    main()
