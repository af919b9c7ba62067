"""Stage 3, training: the pretraining job and its parts: corpus -> batches (pretrain_data), the
jitted sharded step (train), Orbax checkpoints, the loop's chores, metric writers and utilisation."""
