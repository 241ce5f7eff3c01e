"""A faithful PyTorch port of OpenAI's lm-human-preferences (Ziegler et al., 2019)."""

__version__ = "0.1.0"
