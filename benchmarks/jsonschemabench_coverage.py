"""JSONSchemaBench coverage per subset and per path, next to llguidance's in the same run, with one random
walk per compiled schema validated with `jsonschema` (formats asserted too): invalid outputs must be 0.

A schema is compiled as the engine compiles it (`ConstraintService`): the device path (regex -> DFA -> token
tables), and where that refuses a valid schema it cannot express (or one past its budget) the host matcher
(llguidance). "llguidance" is llguidance alone on the same files with the same options (compact JSON, not
lenient). Walks: device path uniform over the allowed tokens then only tokens closer to acceptance
(`sample_walk`); host path uniform with the engine's closing rows (`sample_host_walk`). Prints a JSON line last.

    python benchmarks/jsonschemabench_coverage.py [--data DIR] [--tokenizer DIR] [--limit N] [--no-host]
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys
import time

import jsonschema
import numpy as np

from jaxserve.constrained.grammar import Grammar
from jaxserve.constrained.host_matcher import HostGrammar, HostMatcherError, host_tokenizer, sample_host_walk
from jaxserve.constrained.service import ConstraintService
from jaxserve.constrained.token_table import sample_walk
from jaxserve.constrained.vocab import VocabInfo
from jaxserve.sampling.params import Constraint

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"
WALK_TOKENS = 400


def load_tokenizer(tokenizer_dir: str | None):
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from jaxserve.models.default import default_model_path

        tokenizer_dir = str(default_model_path())
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def end_ids(tok) -> list[int]:
    return sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None})


def load_vocab(tokenizer_dir: str | None) -> VocabInfo:
    tok = load_tokenizer(tokenizer_dir)
    return VocabInfo.from_tokenizer(tok, eos_token_ids=end_ids(tok))


def make_service(tok, vocab: VocabInfo, host: bool = True, device_wait_s: float | None = None) -> ConstraintService:
    """The engine's compile path, uncached in effect (every schema is a new key). device_wait_s None: each
    schema takes the device path whenever that compiles it (coverage per path does not depend on timing)."""
    ends = tuple(vocab.eos_token_ids)
    return ConstraintService(lambda: vocab.tokens, ends, vocab.vocab_width, max_workers=1, cache_bytes=0,
                             host_tokenizer_fn=(lambda: host_tokenizer(tok, vocab.vocab_width, ends)) if host else None,
                             device_wait_s=device_wait_s)


def reason_of(err: Exception) -> str:
    msg = str(err)
    m = re.search(r"keyword '([^']+)'", msg)
    if m:
        return m.group(1)
    if msg.startswith("unsupported $ref"):
        return "$ref"
    if "too complex" in msg:
        return "too complex"
    return msg[:60]


def llguidance_compiles(schema, ll_tok) -> bool:
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "lenient": False})
    except ValueError:
        return False
    return not llguidance.LLMatcher(ll_tok, grammar, log_level=0).is_error()


def load_schema(path: pathlib.Path):
    raw = json.loads(path.read_text())
    return raw.get("json_schema", raw) if isinstance(raw, dict) else raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the embedded default model)")
    ap.add_argument("--limit", type=int, default=0, help="schemas per subset (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-host", action="store_true", help="the device path alone (no host matcher)")
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    vocab = VocabInfo.from_tokenizer(tok, eos_token_ids=end_ids(tok))
    service = make_service(tok, vocab, host=not args.no_host)
    ll_tok = host_tokenizer(tok, vocab.vocab_width, tuple(vocab.eos_token_ids))
    rng = np.random.default_rng(args.seed)
    summary = {}
    for subset in sorted(p for p in pathlib.Path(args.data).iterdir() if p.is_dir()):
        files = sorted(subset.glob("*.json"))[: args.limit or None]
        count = collections.Counter()
        host_ms_per_token: list[float] = []
        reasons: collections.Counter = collections.Counter()
        invalid_files = []
        t0 = time.perf_counter()
        for f in files:
            schema = load_schema(f)
            count["llguidance"] += llguidance_compiles(schema, ll_tok)
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError:
                reasons["invalid schema"] += 1  # the file itself is not a valid JSON schema
                continue
            try:
                grammar = service.compile(Constraint("json_schema", json.dumps(schema)))
            except ValueError as e:
                reasons[reason_of(e)] += 1
                continue
            path = "host" if isinstance(grammar, HostGrammar) else "device"
            count[path] += 1
            try:
                if isinstance(grammar, Grammar):
                    tokens, finished = sample_walk(grammar.table, rng, max_tokens=WALK_TOKENS)
                else:
                    t_walk = time.perf_counter()
                    tokens, finished = sample_host_walk(grammar, vocab.eos_token_ids, rng, max_tokens=WALK_TOKENS)
                    # Per token: the matcher's mask + advance and this walk's unpacking and choice.
                    host_ms_per_token.append((time.perf_counter() - t_walk) * 1000 / (len(tokens) + 1))
            except HostMatcherError as e:  # a limit of the matcher hit mid-walk: that request would fail
                count["failed_host"] += 1
                invalid_files.append((f.name, path, "HostMatcherError", str(e)[:200]))
                continue
            if not finished:
                count[f"unfinished_{path}"] += 1
                continue
            text = b"".join(vocab.tokens[t] for t in tokens).decode("utf-8")
            try:
                validator = jsonschema.validators.validator_for(schema)
                validator(schema, format_checker=validator.FORMAT_CHECKER).validate(json.loads(text))
            except Exception as e:  # JSON or schema error: both count as invalid output
                count[f"invalid_{path}"] += 1
                invalid_files.append((f.name, path, type(e).__name__, text[:200]))
        n = max(len(files), 1)
        compiled = count["device"] + count["host"]
        summary[subset.name] = {
            "total": len(files), "compiled": compiled, "coverage": round(compiled / n, 4),
            "device": count["device"], "host": count["host"], "device_coverage": round(count["device"] / n, 4),
            "llguidance": count["llguidance"], "llguidance_coverage": round(count["llguidance"] / n, 4),
            "invalid": count["invalid_device"] + count["invalid_host"],
            "invalid_device": count["invalid_device"], "invalid_host": count["invalid_host"],
            "unfinished_device": count["unfinished_device"], "unfinished_host": count["unfinished_host"],
            "failed_host": count["failed_host"],
            "host_walk_ms_per_token": {"p50": round(float(np.percentile(host_ms_per_token, 50)), 3),
                                       "p99": round(float(np.percentile(host_ms_per_token, 99)), 3)}
            if host_ms_per_token else None,
            "seconds": round(time.perf_counter() - t0, 1), "reasons": dict(reasons.most_common(12)),
        }
        print(subset.name, json.dumps(summary[subset.name]), file=sys.stderr)
        for name, path, kind, text in invalid_files[:10]:
            print("  INVALID" if kind != "HostMatcherError" else "  FAILED", name, path, kind, text, file=sys.stderr)
    print(json.dumps({"bench": "jsonschemabench_coverage", "host_matcher": not args.no_host, "subsets": summary}))


if __name__ == "__main__":
    main()
