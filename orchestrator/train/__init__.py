"""Training: the loop one worker runs (loop.py, plain torch), its hosts (session.py: this process;
hosts.py: a Ray Train worker or a Tune trial actor), the config a driver hands it (config.py) and
the TorchTrainer a several-worker run is (trainer.py)."""
