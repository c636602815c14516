"""One chat completion: python examples/chat.py [--base-url http://127.0.0.1:30000/v1]"""
from _common import client_and_model

client, model, _ = client_and_model(__doc__)
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=64,
)
print(reply.choices[0].message.content)
print(f"[{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens, "
      f"finish_reason={reply.choices[0].finish_reason}]")
