"""Fine-tuning on top of the training core: chat SFT, LoRA, sequence classification."""
