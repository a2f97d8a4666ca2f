"""Training: the recipe (config checks -> stack + adapter -> DeepSpeed engine), the loop, checkpoints,
rank setup, the DeepSpeed config and its exactness fixes, the flat adapter, regional compile,
validation."""
