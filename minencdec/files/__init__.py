"""Files on disk, knowing nothing of any model: Hugging Face checkpoint directories
(config.json plus safetensors weights) read with every header checked first and written
atomically. The model room imports this one for `save_pretrained`; nothing here imports
the rest of minencdec."""
