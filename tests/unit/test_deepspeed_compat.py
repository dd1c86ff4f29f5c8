"""Every DeepSpeed internal that mole_ds/parallel/deepspeed_compat.py relies on exists in the installed DeepSpeed
(the behaviour itself is tested by tests/dist). A DeepSpeed upgrade that renames one fails here, by name."""
import inspect
from pathlib import Path

import pytest

import deepspeed
from mole_ds.parallel import deepspeed_compat as compat

DS = Path(deepspeed.__file__).parent


def test_installed_version_is_in_the_tested_range():
    compat.check_deepspeed_version()
    with pytest.raises(RuntimeError, match=r"deepspeed 0.20.1 is outside the tested range >=0.19.3,<0.20.0"):
        compat.check_deepspeed_version("0.20.1")


def test_private_group_registry_exists():
    from deepspeed.utils import groups

    for fn in ("_create_expert_and_data_parallel", "_get_expert_parallel_group_dict", "_get_expert_parallel_group",
               "_get_expert_data_parallel_group", "_get_expert_parallel_rank"):
        assert callable(getattr(groups, fn, None)), fn
    assert next(iter(inspect.signature(groups._create_expert_and_data_parallel).parameters)) == "expert_parallel_size_"


@pytest.mark.parametrize("attr,where", [
    ("ds_zero_partition_process_group", "runtime/zero/partition_parameters.py"),
    ("ds_zero_placement_family", "runtime/zero/stage3.py"),
    ("ds_zero_partition_group_name", "runtime/zero/stage3.py"),
    (f'"{compat.EXPERT_FAMILY}"', "runtime/zero/stage3.py"),
    ("fp32_partitioned_groups_flat", "runtime/zero/stage3.py"),
    ("single_partition_of_fp32_groups", "runtime/zero/stage_1_and_2.py"),
    ("def is_moe_param", "moe/utils.py"),
    ("def split_params_into_different_moe_groups_for_optimizer", "moe/utils.py"),
    ("comms_dict", "utils/comms_logging.py"),
    # coalesce_persistent_gathers: what it wraps, and the gather it replaces (a per-tensor all_gather of the
    # released persistent parameters after every step).
    ("self.persistent_parameters[0].all_gather(self.persistent_parameters)", "runtime/zero/stage3.py"),
    ("def _post_step(self", "runtime/zero/stage3.py"),
    ("def checkpoint_event_epilogue(self", "runtime/zero/stage3.py"),
    ("def all_gather_coalesced(params", "runtime/zero/partition_parameters.py"),
])
def test_attribute_read_by_deepspeed(attr, where):
    assert attr in (DS / where).read_text(), f"{attr} not found in deepspeed/{where}"


def test_moe_marker_is_a_deepspeed_moe_without_parameters():
    from deepspeed.moe.layer import MoE

    m = compat.moe_marker(8, 2)
    assert isinstance(m, MoE) and not list(m.parameters()) and m.expert_group_name == "ep_size_2"
    with pytest.raises(RuntimeError, match="never called"):
        m()


def test_tags():
    import torch

    p = torch.nn.Parameter(torch.zeros(2))
    assert not compat.is_expert_param(p)
    compat.tag_expert_param(p, "ep_size_2", None)
    assert compat.is_expert_param(p) and p.group_name == "ep_size_2" and p.ds_zero_placement_family == "autoep_expert"
    from deepspeed.moe.utils import is_moe_param

    assert is_moe_param(p)  # what ZeRO-1/2 and the MoE param-group split test


def test_coalesce_persistent_gathers_leaves_other_optimizers_alone():
    class Plain:
        def _post_step(self):
            return "original"

    opt = Plain()
    assert compat.coalesce_persistent_gathers(opt) is False
    assert opt._post_step() == "original"
