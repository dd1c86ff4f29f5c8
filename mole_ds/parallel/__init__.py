"""Expert parallelism: DeepSpeed process groups, the all-to-all token dispatcher, DeepSpeed parameter tags."""
from .dispatcher import ExpertParallelDispatcher
from .expert_parallel import (all_to_all_bytes, apply_expert_parallel, is_expert_param,
                              patch_model_expert_parallel, tag_expert_param)
from .groups import EPContext, check_ep_size, create_expert_groups

__all__ = ["EPContext", "ExpertParallelDispatcher", "all_to_all_bytes", "apply_expert_parallel", "check_ep_size",
           "create_expert_groups", "is_expert_param", "patch_model_expert_parallel", "tag_expert_param"]
