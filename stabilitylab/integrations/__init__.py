"""Framework integrations: thin callbacks that build a ``Monitor`` inside someone else's training loop.

- ``stabilitylab.integrations.hf.StabilityCallback``: Hugging Face ``transformers.Trainer``
- ``stabilitylab.integrations.lightning.StabilityCallback``: ``lightning.Trainer`` (or ``pytorch_lightning``)

Import the submodule you need; each imports its framework (this package imports neither).
"""
