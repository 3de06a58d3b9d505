"""The model's life in weights: see weights/model.py."""
