"""JSONSchemaBench coverage: compiled / total per subset, reasons for failures, and one random walk per
compiled schema validated with `jsonschema` (invalid outputs must be 0). Prints a JSON line last.

    python benchmarks/jsonschemabench_coverage.py [--data DIR] [--tokenizer DIR] [--limit N]
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

from jaxserve.constrained.compiler import compile_constraint
from jaxserve.constrained.token_table import sample_walk
from jaxserve.constrained.vocab import VocabInfo

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"


def load_vocab(tokenizer_dir: str | None) -> VocabInfo:
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from jaxserve.models.default import default_model_path  # written by the model engineer

        tokenizer_dir = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None})
    return VocabInfo.from_tokenizer(tok, eos_token_ids=eos)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the embedded default model)")
    ap.add_argument("--limit", type=int, default=0, help="schemas per subset (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    vocab = load_vocab(args.tokenizer)
    rng = np.random.default_rng(args.seed)
    summary = {}
    for subset in sorted(p for p in pathlib.Path(args.data).iterdir() if p.is_dir()):
        files = sorted(subset.glob("*.json"))
        if args.limit:
            files = files[: args.limit]
        compiled = invalid = unfinished = 0
        reasons: collections.Counter = collections.Counter()
        invalid_files = []
        t0 = time.perf_counter()
        for f in files:
            raw = json.loads(f.read_text())
            schema = raw.get("json_schema", raw) if isinstance(raw, dict) else raw
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError:
                reasons["invalid schema"] += 1  # the file itself is not a valid JSON schema
                continue
            try:
                table = compile_constraint("json_schema", json.dumps(schema), vocab)
            except ValueError as e:
                reasons[reason_of(e)] += 1
                continue
            compiled += 1
            tokens, finished = sample_walk(table, rng)
            if not finished:
                unfinished += 1
                continue
            text = b"".join(vocab.tokens[t] for t in tokens).decode("utf-8")
            try:
                jsonschema.validate(json.loads(text), schema)
            except Exception as e:  # JSON or schema error: both count as invalid output
                invalid += 1
                invalid_files.append((f.name, type(e).__name__, text[:200]))
        summary[subset.name] = {
            "total": len(files), "compiled": compiled, "coverage": round(compiled / max(len(files), 1), 4),
            "invalid": invalid, "unfinished": unfinished, "seconds": round(time.perf_counter() - t0, 1),
            "reasons": dict(reasons.most_common(12)),
        }
        print(subset.name, json.dumps(summary[subset.name]), file=sys.stderr)
        for name, kind, text in invalid_files[:10]:
            print("  INVALID", name, kind, text, file=sys.stderr)
    print(json.dumps({"bench": "jsonschemabench_coverage", "subsets": summary}))


if __name__ == "__main__":
    main()
