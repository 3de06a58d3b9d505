"""The deploy stage: the winner's bundle behind HTTP on Ray Serve."""

from orchestrator.serve.app import deploy, endpoint_url, shutdown

__all__ = ["deploy", "endpoint_url", "shutdown"]
