"""The steering sampler: batched decoding that edits the payoff in place.

One concern per module: sampler.py (``SteeringSampler``: settings and ``generate``), engine.py (the
batching engine: the decoding loop, prefill, refills of freed lanes), draw.py (the draw: seeds,
forced tokens, steering bias), payoff_edit.py (payoff detection and the in-place rewrite),
steering.py (analyze-time steering after an edit), reference_call.py (mode ``"reference"``'s
second call), rows.py (the output records and per-row state), static_cache.py (the static KV
cache), decode_graph.py (the captured one-token step), detokenize.py (incremental text and the tag
scanner).
"""
