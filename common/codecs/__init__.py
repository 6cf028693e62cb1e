"""Update codecs behind one small interface (``base.Codec``).

Wired into the rounds (``registry``): ``identity``, ``quantize``, ``projection`` (orthonormal
per-round basis, error feedback), ``topk`` (error feedback) and ``eigen`` (EoRA-style activation
eigenspaces; its bases are a ``state.CodecState`` the aggregator serves by digest). In the library
and the quality benchmark, not yet in the daemons: ``autoencoder`` (CG-FedLLM, TGAP/FAF, linear
or MLP decoder) and ``countsketch`` (without the FetchSGD server loop). Linear codecs (decode of
a sum = sum of decodes) run under secure aggregation; ``feedback.ErrorFeedback`` keeps on the
agent what a biased codec dropped.
"""
