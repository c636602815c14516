"""Function calling: the model asks for a tool, we run it, and send the result back for the final answer."""
import json

from _common import client_and_model

client, model, _ = client_and_model(__doc__)
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def get_weather(city: str) -> str:
    return json.dumps({"city": city, "temperature_c": 18, "sky": "clear"})  # a stand-in for a real weather API


messages = [{"role": "user", "content": "What's the weather in Paris right now?"}]
# tool_choice="required" makes the server constrain the output to a call of one of the tools;
# with "auto" the model decides and the server parses its <tool_call> / JSON call format.
reply = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                       temperature=0, max_tokens=128)
message = reply.choices[0].message
print("finish_reason:", reply.choices[0].finish_reason)
if not message.tool_calls:
    print("no tool call; the model said:", message.content)
else:
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        print(f"tool call: {call.function.name}({args})")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": get_weather(**args)})
    final = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=96)
    print("answer:", final.choices[0].message.content)
