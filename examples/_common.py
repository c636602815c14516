"""Shared by the examples: `--base-url` / `--api-key` / `--model` flags and an OpenAI client."""
from __future__ import annotations

import argparse

from openai import OpenAI


def client_and_model(description: str) -> tuple[OpenAI, str, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    p.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    p.add_argument("--model", default=None, help="default: the model the server serves")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    return client, model, args
