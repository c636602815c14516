"""When a sequence stops, and what text it emits: EOS and stop token ids, max_tokens and the context
length, and stop strings matched on the detokenized text (text that may begin a stop string is held back
so a stop string is never streamed)."""
from __future__ import annotations

from jaxserve.engine.request import Sequence


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def advance(seq: Sequence, token: int, end_token_ids: tuple[int, ...], max_model_len: int) -> tuple[str, int | str | None] | None:
    """Account for `token` just appended to `seq.output_ids`: update the text to emit
    (`seq.pending_emit`), return (finish_reason, stop_reason) if the sequence is done, else None."""
    p = seq.params
    is_end = token in end_token_ids and not p.ignore_eos
    is_stop_id = token in p.stop_token_ids
    new_text = ""
    if not ((is_end or is_stop_id) and not p.no_stop_trim):
        new_text = seq.detokenizer.push([token])
    buf = seq.pending_text + new_text
    finish: tuple[str, int | str | None] | None = None
    if p.stop and buf:
        full = seq.text + buf
        search_from = max(0, len(seq.text) - max(len(s) for s in p.stop) + 1)
        hits = [(full.find(s, search_from), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            idx, stop = min(hits)
            end = idx + len(stop) if p.no_stop_trim else idx
            emit = full[len(seq.text):end] if end >= len(seq.text) else ""
            seq.text += emit
            seq.pending_emit += emit
            seq.pending_text = ""
            return "stop", stop
    n_out = seq.num_resolved  # tokens of steps still in flight do not count yet
    if is_end and n_out >= p.min_tokens:
        finish = ("stop", None)
    elif is_stop_id and n_out >= p.min_tokens:
        finish = ("stop", token)
    elif n_out >= seq.max_tokens or len(seq.prompt_ids) + n_out >= max_model_len:
        finish = ("length", None)
    if finish is None and p.stop:
        hold = _held_back(buf, p.stop)
        emit, seq.pending_text = buf[: len(buf) - hold], buf[len(buf) - hold:]
    else:
        emit, seq.pending_text = buf, ""
        if finish is not None:
            emit += seq.detokenizer.flush()
    seq.text += emit
    seq.pending_emit += emit
    return finish
