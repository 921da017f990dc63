"""Checkpoint formats: lowbit's own (safetensors + lowbit.json), and exports."""
