"""Structured output: response_format json_schema guarantees a JSON object matching the schema."""
import json

from _common import client_and_model

client, model, _ = client_and_model(__doc__)
schema = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population_millions": {"type": "number"}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
    temperature=0,
    max_tokens=96,
    response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
)
print(json.dumps(json.loads(reply.choices[0].message.content), indent=2))
