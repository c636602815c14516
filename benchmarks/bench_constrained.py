"""Constraint compile time over JSONSchemaBench with the SmolLM2 vocabulary, next to outlines-core's `Index`
on the same regexes in the same run. Prints p50/p99/max (ms) and a JSON line last.

    python benchmarks/bench_constrained.py [--data DIR] [--tokenizer DIR] [--stride N]

outlines-core runs on every --outlines-stride'th compiled schema; "same_schemas" compares on exactly those.
Ours: JSON schema -> regex -> DFA -> token tables (compile_constraint, uncached). outlines-core: `Index`
built from the regex our converter produced (its own JSON-schema converter covers different features).
Schemas the device path refuses go through the engine's fallback (`ConstraintService`: the device attempt,
then llguidance's host matcher): `host_path`, timed whole. Also reported: `engine_grammar_prep`, what the engine adds once per distinct constraint (`make_grammar`: the
closing rows and the token classes of the device transition tables), and ours with it."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from jaxserve.constrained.compiler import compile_constraint
from jaxserve.constrained.grammar import make_grammar
from jaxserve.constrained.json_schema import json_schema_to_regex

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from jsonschemabench_coverage import DEFAULT_DATA, load_tokenizer, load_vocab, make_service  # noqa: E402

from jaxserve.sampling.params import Constraint  # noqa: E402


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--stride", type=int, default=1, help="use every Nth schema of each subset")
    ap.add_argument("--outlines-stride", type=int, default=10,
                    help="outlines-core on every Nth compiled schema (it takes seconds to minutes on large ones)")
    ap.add_argument("--no-outlines", action="store_true")
    ap.add_argument("--no-host", action="store_true", help="skip the host-matcher path for schemas the device path refuses")
    args = ap.parse_args()
    vocab = load_vocab(args.tokenizer)
    outlines_vocab = None
    if not args.no_outlines:
        import outlines_core

        eos = vocab.eos_token_ids[0]
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.tokens):
            if b is not None and i != eos:
                by_bytes.setdefault(b, []).append(i)
        outlines_vocab = outlines_core.Vocabulary(eos, by_bytes)
    ours, theirs, both_ours, both_theirs = [], [], [], []
    # CPU time too: on a shared machine wall time includes waiting for a core.
    ours_cpu, theirs_cpu = [], []
    engine_prep, ours_total = [], []
    failures = {"ours": 0, "outlines": 0, "host": 0}
    host_path, host_build = [], []
    service = None
    if not args.no_host:
        tok = load_tokenizer(args.tokenizer)
        service = make_service(tok, vocab)
    files = [f for sub in sorted(p for p in pathlib.Path(args.data).iterdir() if p.is_dir())
             for f in sorted(sub.glob("*.json"))[:: args.stride]]
    for f in files:
        text = f.read_text()
        try:
            regex = json_schema_to_regex(text)
            t0, c0 = time.perf_counter(), time.process_time()
            table = compile_constraint("json_schema", text, vocab)
            ours_ms = (time.perf_counter() - t0) * 1000
            ours_cpu.append((time.process_time() - c0) * 1000)
        except ValueError:
            failures["ours"] += 1
            if service is not None:  # the engine's fallback: the device attempt, then the host matcher
                t0 = time.perf_counter()
                try:
                    grammar = service.compile(Constraint("json_schema", text))
                except ValueError:
                    failures["host"] += 1
                    continue
                host_path.append((time.perf_counter() - t0) * 1000)
                host_build.append(grammar.compile_seconds * 1000)
            continue
        ours.append(ours_ms)
        # What the engine adds once per distinct constraint: closing rows and the device transition tables.
        t0 = time.perf_counter()
        make_grammar(table)
        prep_ms = (time.perf_counter() - t0) * 1000
        engine_prep.append(prep_ms)
        ours_total.append(ours_ms + prep_ms)
        if outlines_vocab is None or (len(ours) - 1) % args.outlines_stride:
            continue
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            outlines_core.Index(regex, outlines_vocab)
            theirs_ms = (time.perf_counter() - t0) * 1000
            theirs_cpu.append((time.process_time() - c0) * 1000)
        except Exception:  # outlines-core rejects some regexes or runs out of its own limits
            failures["outlines"] += 1
            continue
        theirs.append(theirs_ms)
        both_ours.append(ours_ms)
        both_theirs.append(theirs_ms)
    result = {
        "bench": "bench_constrained", "schemas": len(files), "vocab_size": vocab.vocab_size,
        "ours": percentiles(ours), "outlines_core": percentiles(theirs),
        "engine_grammar_prep": percentiles(engine_prep), "ours_with_engine_prep": percentiles(ours_total),
        # Schemas the device path refuses: request to HostGrammar (the device attempt included), and
        # llguidance's grammar build alone.
        "host_path": percentiles(host_path), "host_matcher_build": percentiles(host_build),
        "cpu_time": {"ours": percentiles(ours_cpu), "outlines_core": percentiles(theirs_cpu)},
        "same_schemas": {"ours": percentiles(both_ours), "outlines_core": percentiles(both_theirs)},
        "failures": failures,
    }
    print(json.dumps(result, indent=1), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
