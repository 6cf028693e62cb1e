"""Update codecs behind one small interface (``base.Codec``).

``identity`` is what the daemons send today. ``quantize`` and ``projection`` are linear (usable
under secure aggregation), ``topk`` is not; ``feedback.ErrorFeedback`` keeps what a biased codec
dropped on the agent. Wiring these into the rounds, the count sketch and the autoencoder codecs
are the rest of issue 5.
"""
