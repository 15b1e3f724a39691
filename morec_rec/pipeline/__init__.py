"""The TorchRec glue: batches, the training job, checkpoints."""
