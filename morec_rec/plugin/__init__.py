"""What a training job imports: the MoRec object, its loader and loss hook, the sampler and
weight store (``sampling``), the controllers (``control``), full-ranking evaluation
(``eval``) and the TorchRec adapter. Nothing here imports TorchRec or the reference jobs."""
