"""Expert parallelism: the token dispatcher (all-to-all), layouts and the cost model that picks one, activation
checkpointing (applied after the model is built, like expert parallelism), and the DeepSpeed internals they rely
on (deepspeed_compat; its docstring lists the few other modules that read DeepSpeed formats)."""
from .activation_checkpoint import apply_activation_checkpointing
from .all_to_all import CommStats
from .deepspeed_compat import is_expert_param, tag_expert_param
from .dispatcher import ExpertParallelDispatcher
from .expert_parallel import all_to_all_bytes, apply_expert_parallel, comm_stats, patch_model_expert_parallel
from .groups import EPContext, check_ep_size, create_expert_groups

__all__ = ["CommStats", "EPContext", "apply_activation_checkpointing", "ExpertParallelDispatcher", "all_to_all_bytes", "apply_expert_parallel",
           "check_ep_size", "comm_stats", "create_expert_groups", "is_expert_param", "patch_model_expert_parallel",
           "tag_expert_param"]
