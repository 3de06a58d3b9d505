"""Smaller and faster variants of a run's winner: int8 quantization, pruning with a recovery
fine-tune, distillation into a smaller student; each evaluated, measured and, within the spec's
quality bound, served (stage.py)."""
