"""Every invalid MoLE config field gives its own message naming field and value; all at once."""
import pytest

from mole_ds import MoLEConfig

CASES = [
    (dict(num_experts=0), r"mole.num_experts \(0\) must be >= 1"),
    (dict(num_experts=2.5), r"mole.num_experts \(2.5\) must be an integer"),
    (dict(top_k=4, num_experts=3), r"mole.top_k \(4\) must be <= mole.num_experts \(3\)"),
    (dict(top_k=0), r"mole.top_k \(0\) must be >= 1"),
    (dict(rank=0), r"mole.rank \(0\) must be >= 1"),
    (dict(alpha=0), r"mole.alpha \(0\) must be > 0"),
    (dict(alpha="big"), r"mole.alpha \('big'\) must be a number"),
    (dict(dropout=1.0), r"mole.dropout \(1.0\) must be in \[0, 1\)"),
    (dict(routing="soft"), r"mole.routing \('soft'\) must be one of sparse, weighted, st, dense, oracle"),
    (dict(balance_loss="aux"), r"mole.balance_loss \('aux'\) must be one of mole, switch, none"),
    (dict(balance_coef=-1), r"mole.balance_coef \(-1\) must be >= 0"),
    (dict(z_loss_coef=-0.1), r"mole.z_loss_coef \(-0.1\) must be >= 0"),
    (dict(backend="cuda"), r"mole.backend \('cuda'\) must be one of auto, torch, loop, megablocks"),
    (dict(attn_lora="yes"), r"mole.attn_lora \('yes'\) must be true or false"),
    (dict(num_experts=6, ep_size=4), r"mole.num_experts \(6\) must be divisible by mole.ep_size \(4\)"),
    (dict(ep_size=0), r"mole.ep_size \(0\) must be >= 1"),
    (dict(ep_size="max"), r"mole.ep_size \('max'\) must be a positive integer or 'auto'"),
    (dict(routing="oracle", top_k=2), r"mole.top_k \(2\) must be 1 with mole.routing 'oracle'"),
]


@pytest.mark.parametrize("kwargs,message", CASES)
def test_each_invalid_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoLEConfig(**kwargs)


def test_all_problems_listed_at_once():
    with pytest.raises(ValueError) as err:
        MoLEConfig(num_experts=0, routing="soft", dropout=-1)
    text = str(err.value)
    assert "mole.num_experts (0)" in text and "mole.routing ('soft')" in text and "mole.dropout (-1)" in text


def test_defaults_and_from_dict():
    c = MoLEConfig()
    assert (c.num_experts, c.top_k, c.rank, c.alpha, c.dropout, c.routing, c.balance_loss) == (3, 1, 32, 64, 0.05, "sparse", "mole")
    assert c.scaling == 2.0 and c.attn_lora and c.backend == "auto"
    assert MoLEConfig.from_dict({"num_experts": 8, "ep_size": 2}).ep_size == 2
    assert MoLEConfig(ep_size="auto").ep_size == "auto"
    with pytest.raises(ValueError, match="unknown mole config key\\(s\\): num_expert"):
        MoLEConfig.from_dict({"num_expert": 8})
