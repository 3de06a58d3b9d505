"""The sweep stage: Ray Tune over the spec's search space (optimizer, regularization,
architecture, size), each trial trained in its trial actor or as a Ray Train run, ASHA early
stopping, and the table of every trial in the run directory (tuner.py)."""
