"""Secure aggregation (Bonawitz et al. CCS 2017, SecAgg+ neighbour graph of Bell et al. 2020).

Plain Python, numpy and ``cryptography``; no gRPC. ``ring`` (fixed point in Z_2^32),
``prg`` (AES-256-CTR mask expansion), ``shamir`` (threshold sharing), ``keys``
(X25519 agreement, signed advertisements, share encryption), ``graph`` (who masks with
whom), and the two protocol state machines: ``agent`` and ``server``.
"""
