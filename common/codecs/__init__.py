"""Update codecs behind one small interface (``base.Codec``).

Wired into the rounds (``registry``): ``identity``, ``quantize``, ``projection`` (orthonormal
per-round basis, error feedback), ``topk`` (error feedback), ``eigen`` (EoRA-style activation
eigenspaces) and ``autoencoder`` (CG-FedLLM, linear or MLP decoder; the aggregator's TGAP/FAF
schedule is ``server.autoencoder``) and ``countsketch`` (the round's summed sketch goes through
FetchSGD's server loop, ``server.fetchsgd``). Bases and networks are ``state.CodecState`` files the
aggregator serves by digest.
Linear codecs (decode of a sum = sum of decodes) run under secure aggregation;
``feedback.ErrorFeedback`` keeps on the agent what a biased codec dropped.
"""
