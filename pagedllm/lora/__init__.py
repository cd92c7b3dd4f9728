"""Multi-LoRA serving: PEFT adapters over one base model, several in one step (see docs/architecture.md)."""
