"""Where models come from: the registry (`model/registry.yaml`), the embedded models built in code, and checkpoints
on the Hub or object storage. The registry's names are this package's: `from skyreels_batch.models import card_for`.
"""

from skyreels_batch.models.registry import (
    CARD_FILENAME,
    ModelCard,
    RowDefaults,
    UnknownModelError,
    attention_heads,
    card_for,
    cards,
)

__all__ = ["CARD_FILENAME", "ModelCard", "RowDefaults", "UnknownModelError", "attention_heads", "card_for", "cards"]
