"""The model: the transformer, attention, LoRA, sharding rules and FLOP counts."""
