"""The deploy stage: the winner's bundle behind an OpenAI-compatible HTTP API on Ray Serve.

  protocol.py  request bodies, errors, conversion to sampling parameters
  server.py    ModelServer: a loaded bundle, its engine, tokenization off the event loop
  routes.py    the FastAPI app: ~20-line routes, middleware (body limit, JSON 500, metrics)
  auth.py      API keys
  app.py       the Serve deployment, deploy, Serve config
  samples.py   the requests a run sends its freshly deployed service

The engine and sampling it serves with live in inference/, shared with batch inference. The
names below load lazily, so that importing serve.auth or serve.protocol imports no Ray.
"""

from typing import Any

__all__ = ["DeployError", "app_name", "build_app", "deploy", "endpoint_url", "load_keys",
           "serve_config_yaml", "shutdown"]


def __getattr__(name: str) -> Any:
    if name == "load_keys":
        from orchestrator.serve.auth import load_keys

        return load_keys
    if name in __all__:
        from orchestrator.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'orchestrator.serve' has no attribute {name!r}")
