"""The outer level of MoRec: controllers and coordinators that turn per-objective losses
into one loss. A :class:`~morec_rec.plugin.control.pi.PIController` holds one objective's
loss at a target by scaling that objective's term; a
:class:`~morec_rec.plugin.control.coordinator.Coordinator` owns the fixed weights (1 for
accuracy, λ·p for the others) and the controllers of the held objectives, and turns what
they measure into the coefficients of the loss that is backpropagated (docs/method.md,
"The coordinator and the PI controller"): each step's per-objective training losses, or
each validation pass's metrics relative to the base's
(:mod:`~morec_rec.plugin.control.measures`).
"""
