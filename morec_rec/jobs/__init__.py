"""The reference jobs on TorchRec: backbones, pretraining, MoRec continued training with
checkpoints and selection, full-ranking evaluation, the paired bootstrap, plots and the
``morec-rec`` command. They use the plugin as any job would; nothing below imports them."""
