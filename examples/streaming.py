"""Stream a chat completion token by token (Server-Sent Events), with usage at the end."""
from _common import client_and_model

client, model, _ = client_and_model(__doc__)
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a haiku about Paris."}],
    temperature=0.7,
    max_tokens=64,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n[{chunk.usage.completion_tokens} tokens]")
