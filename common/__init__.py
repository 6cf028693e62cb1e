"""Code shared by the aggregator and the agent: config, PKI, TLS, protocol cores."""

__version__ = "0.1.0"
