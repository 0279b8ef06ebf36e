"""emactl: a research toolkit for Expectation-Maximization Attention Networks (EMANet)."""

__version__ = "0.1.0"
