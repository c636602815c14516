"""Constrain the output to a regular expression (jaxserve/SGLang extension `regex`)."""
import re

from _common import client_and_model

client, model, _ = client_and_model(__doc__)
pattern = r"(Paris|London|Berlin|Madrid|Rome)"
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France? Answer with the city name only."}],
    temperature=0,
    max_tokens=16,
    extra_body={"regex": pattern},
)
text = reply.choices[0].message.content
print(text, "(matches)" if re.fullmatch(pattern, text) else "(does NOT match)")
