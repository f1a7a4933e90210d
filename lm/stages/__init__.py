"""Training stages: pretraining and supervised fine-tuning (the preference stages live in lm/align)."""
