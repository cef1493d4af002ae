"""Fine-tuning: data formats into batches, LoRA/DoRA adapters or whole layers trained, fused back."""
