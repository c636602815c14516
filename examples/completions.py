"""Legacy text completion (no chat template), with per-token logprobs."""
from _common import client_and_model

client, model, _ = client_and_model(__doc__)
reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
choice = reply.choices[0]
print(repr(choice.text))
for token, logprob in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs):
    print(f"{token!r:>14} {logprob:8.3f}")
