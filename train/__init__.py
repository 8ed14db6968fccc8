"""Training entry points: `python -m train.gates` (MeteoRA gates) and `python -m train.lora` (one adapter)."""
