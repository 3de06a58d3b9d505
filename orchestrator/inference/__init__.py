"""What a Serve replica, batch inference and the compress stage compute, without Ray or HTTP.

  sampling.py   sampling parameters and the safe arithmetic of picking a token
  engine.py     continuous batching over the KV cache (plain Python + torch)
  predictor.py  a loaded bundle's classification and batched generation on the engine
"""
