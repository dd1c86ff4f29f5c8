"""Expert parallelism: the token dispatcher (all-to-all), layouts and the cost model that picks one, and the
DeepSpeed internals they rely on (deepspeed_compat, the only module that touches them)."""
from .all_to_all import CommStats
from .deepspeed_compat import is_expert_param, tag_expert_param
from .dispatcher import ExpertParallelDispatcher
from .expert_parallel import all_to_all_bytes, apply_expert_parallel, comm_stats, patch_model_expert_parallel
from .groups import EPContext, check_ep_size, create_expert_groups

__all__ = ["CommStats", "EPContext", "ExpertParallelDispatcher", "all_to_all_bytes", "apply_expert_parallel",
           "check_ep_size", "comm_stats", "create_expert_groups", "is_expert_param", "patch_model_expert_parallel",
           "tag_expert_param"]
