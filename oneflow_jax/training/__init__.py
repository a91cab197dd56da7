"""Training: meshes and the logical-axis rules (`sharding`), the train state and jitted step (`train_state`), the
loop (`loop`), the validation loss (`validation`), Orbax checkpoints (`checkpointing`), metric writers
(`metrics_logging`), analytic FLOPs (`flops`) and compile-only memory fit checks (`aot`)."""
