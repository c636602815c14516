"""The OpenAI-compatible HTTP layer (FastAPI). Only this package and jaxserve.launch import fastapi/uvicorn/pydantic."""
