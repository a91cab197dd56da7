"""Data: the built-in shapes-world generator (`shapes_world`), users' files (`sources`), tfds builders writing
ArrayRecord shards (`datasets`), the sharded latent precompute (`precompute`), damaged shards (`records`),
tokenizers (`tokenizer`, `hf_tokenizer`), the Grain input pipeline (`input_pipeline`), encoding images in the train
step (`encode_in_step`) and the packing of noised documents into fixed rows (`packing`)."""
