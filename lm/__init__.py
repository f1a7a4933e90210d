"""lm: train transformer language models from scratch and do scaling-law science with them."""
