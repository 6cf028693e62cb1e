"""Update codecs behind one small interface (``base.Codec``).

``identity``, ``quantize``, ``projection`` and ``topk`` are wired into the rounds (``registry``);
``countsketch`` is not yet. ``quantize``, ``projection`` and ``countsketch`` are linear (usable
under secure aggregation), ``topk`` is not; ``feedback.ErrorFeedback`` keeps what a biased codec
dropped on the agent. The FetchSGD server loop, the eigenspace basis and the autoencoder codecs
are the rest of issue 5.
"""
