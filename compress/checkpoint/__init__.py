"""Model I/O and formats: reading checkpoints (``source``: HF folders, hub ids, GGUF files, lazy
safetensors per block), the packed containers (``formats``, ``packing``), writing the export
(``export``, atomic) and loading it back as modules that run (``load``); ``tuning`` holds the
trainable views distillation puts in place of the packed containers."""
