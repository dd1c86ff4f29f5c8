"""The MoLE math: router, LoRA experts, dispatch backends, the MoLE MLP block and its losses.

Nothing in this package talks to other processes; expert parallelism wraps a dispatcher around it
(see mole_ds.parallel).

Shape-suffix legend used in names: B batch, S sequence, T tokens (B*S), D hidden, F intermediate,
E experts, K experts per token, R rows after dispatch (T*K), r LoRA rank, O output features.
"""
