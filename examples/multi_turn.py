"""A multi-turn conversation: the history is resent each turn (the server keeps no session state)."""
from _common import client_and_model

client, model, _ = client_and_model(__doc__)
messages = [{"role": "system", "content": "You are a concise geography tutor."}]
for question in ["What is the capital of France?", "And how many people live there?", "Name one famous museum in it."]:
    messages.append({"role": "user", "content": question})
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=96)
    answer = reply.choices[0].message.content
    messages.append({"role": "assistant", "content": answer})
    print(f"user: {question}\nassistant: {answer}\n")
