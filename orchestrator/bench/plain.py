"""The service's FastAPI app on plain uvicorn in one process, without Ray or batching: the serve
benchmark's baseline, the server a user would write by hand.

    python -m orchestrator.bench.plain BUNDLE_DIR PORT
"""

from __future__ import annotations

import sys

import uvicorn

from orchestrator.records import SPEC_FILE
from orchestrator.serve.routes import create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import load_spec


def main(argv: list[str]) -> None:
    bundle_dir, port = argv[0], int(argv[1])
    limits = load_spec(f"{bundle_dir}/{SPEC_FILE}").serve
    app = create_api(ModelServer(bundle_dir, limits, key_digests=[], batching=False))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
