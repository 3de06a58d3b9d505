"""The train stage: one Ray Train (TorchTrainer) run per sweep trial."""
