"""Constrained decoding: regex / JSON schema -> byte DFA -> per-state token masks on the device.

Modules (host side is NumPy; only `tables` touches JAX):
  vocab.py         token id -> exact bytes; VocabInfo (bytes, EOS ids, logit width, trie, fingerprint)
  regex_parser.py  Python regex syntax -> IR over code points (and IR -> portable regex text)
  regex_dfa.py     IR -> minimal byte-level DFA (UTF-8 expansion, subset construction, Moore refinement)
  json_schema.py   JSON schema / json_object -> regex
  token_walk.py    DFA x vocabulary -> TokenTable (vectorized trie walk)
  token_table.py   TokenTable (mask, next states, forced tokens) and sample walks
  budget.py        CompileBudget (time + memory-proportional limits), BudgetMeter, ConstraintTooComplex
  compiler.py      compile_constraint + ConstraintCompiler (thread-safe LRU cache bounded in bytes)
  gc_pause.py      the cyclic garbage collector paused during compiles (counted across threads)
  service.py       ConstraintService: constraint -> Grammar for the engine (own pool, byte-bounded cache)
  grammar.py       Grammar: closing rows that finish within max_tokens, token classes for the device advance
  tables.py        GrammarPool (device mask rows + transition tables), apply_token_mask, the device advance
"""
