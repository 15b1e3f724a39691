"""What a training job imports: the MoRec object, its loader and loss hook, and their
TorchRec adapter. Nothing here imports TorchRec."""
