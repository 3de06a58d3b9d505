"""The deploy stage: the winner's bundle behind an OpenAI-compatible HTTP API on Ray Serve."""

from orchestrator.serve.app import (
    DeployError,
    app_name,
    build_app,
    deploy,
    endpoint_url,
    serve_config_yaml,
    shutdown,
)
from orchestrator.serve.auth import load_keys

__all__ = ["DeployError", "app_name", "build_app", "deploy", "endpoint_url", "load_keys",
           "serve_config_yaml", "shutdown"]
