"""Data: the built-in shapes-world generator (`shapes_world`), tfds builders writing ArrayRecord shards
(`datasets`), SentencePiece tokenizers (`tokenizer`), the Grain input pipeline (`input_pipeline`) and the packing of
noised documents into fixed rows (`packing`)."""
