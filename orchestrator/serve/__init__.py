"""The deploy stage: the winner's bundle behind an OpenAI-compatible HTTP API on Ray Serve.

  protocol.py  request bodies, errors, conversion to sampling parameters
  server.py    ModelServer: a loaded bundle, its engine, tokenization off the event loop
  routes.py    the FastAPI app: ~20-line routes, middleware (API key, body limit, JSON 500,
               metrics)
  auth.py      API keys
  app.py       the Serve deployment, deploy, Serve config
  samples.py   the requests a run sends its freshly deployed service

The engine and sampling it serves with live in inference/, shared with batch inference. The
names in __all__ load lazily, so that importing serve.auth or serve.protocol imports no Ray.
"""

from typing import Any

__all__ = ["app_name", "build_app", "check_deployable", "deploy", "endpoint_url", "held_by_services",
           "load_keys", "remove", "running_apps", "scratch_app_name", "serve_config_yaml",
           "services", "shutdown", "undeploy"]


class DeployError(RuntimeError):
    """A deploy that cannot succeed (a bundle that cannot load, a port or route Serve cannot
    give); whatever served before keeps serving. Defined here, without Ray, so that the CLI can
    catch it cheaply."""


def __getattr__(name: str) -> Any:
    if name == "load_keys":
        from orchestrator.serve.auth import load_keys

        return load_keys
    if name in __all__:
        from orchestrator.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'orchestrator.serve' has no attribute {name!r}")
