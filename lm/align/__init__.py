"""Preference learning after fine-tuning: a gold-rewarded task, preference pairs, a reward model,
RLHF with PPO, DPO and best-of-n sampling (docs/preference.md)."""
