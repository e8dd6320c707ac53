"""tre_edu: Trust Region Entropy for PPO on language models."""

__version__ = "0.1.0"
