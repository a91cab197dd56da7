"""Checkpoint conversion: safetensors I/O without torch (`safetensors_io`), the PyTorch mirror of the model
(`torch_modeling`) and the export to it (`torch_export`), and initialisation from Llama 3 (`import_llama`)."""
