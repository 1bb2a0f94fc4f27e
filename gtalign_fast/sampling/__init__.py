"""The steering sampler: batched decoding that edits the payoff in place.

sampler.py (``SteeringSampler``: the batching engine, payoff detection and rewrite, analyze-time
steering, the reference's second call), static_cache.py (the static KV cache), decode_graph.py
(the CUDA-graphed one-token step), detokenize.py (incremental text and the tag scanner).
"""
