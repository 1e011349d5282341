"""`dualblade serve`: an OpenAI-compatible server on llama-cpp-python's server stack (FastAPI, uvicorn,
sse-starlette) and its request types (llama_cpp.server.types), whose conversations keep their KV on storage.

api.py: the OpenAI error body and request bodies; engine.py: the model context, its queue and worker thread;
limits.py: what a request may be; app.py: the FastAPI app and its routes.
"""
from .api import ApiError
from .app import create_app, serve_forever
from .engine import Engine, Job, ServedLlama
from .limits import BodyLimit, Limits

__all__ = ["ApiError", "BodyLimit", "Engine", "Job", "Limits", "ServedLlama", "create_app", "serve_forever"]
