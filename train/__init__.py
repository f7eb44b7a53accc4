"""Training: train/finetune.py (accelerate launch train/finetune.py, or python -m train.finetune) and its helpers."""
