"""The ``hf-influence`` console script."""
