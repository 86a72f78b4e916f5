import numpy as np
import pytest

from dynaexq_jax import budget
from dynaexq_jax.budget import BudgetError, format_size, parse_size
from dynaexq_jax.models import registry


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("20GB", 20 * 10**9),
        ("20 GB", 20 * 10**9),
        (" 20GB ", 20 * 10**9),
        ("5.5GB", 5_500_000_000),
        ("20GiB", 20 * 2**30),
        ("20gib", 20 * 2**30),
        ("20GIB", 20 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("64KB", 64_000),
        ("64kB", 64_000),
        ("64KiB", 65_536),
        ("0.5GiB", 2**29),
        ("1.5TB", 1_500_000_000_000),
        (".5GB", 500_000_000),
        ("8.2GB", 8_200_000_000),  # exact decimal arithmetic: float gives 8199999999.999999
        ("1.0000000001KB", 1000),  # fractions of a byte round down
        ("123456", 123456),
        (123456, 123456),
        (np.int64(7), 7),
    ],
)
def test_parse_size_accepts(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "GB",
        "20GX",
        "20 G B",
        "-5GB",
        "0GB",
        "0",
        "0.0000001KB",
        "1e3GB",
        "inf",
        "nan",
        "5.5",
        "20gb",  # accelerate reads lowercase 'b' as bits
        "20Gb",
        "20\nGB",
        0,
        -1,
        True,
        2.5e9,
        None,
    ],
)
def test_parse_size_rejects_with_one_line_message_and_example(text):
    with pytest.raises(BudgetError) as err:
        parse_size(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(text) in msg
    assert "20GB" in msg and "20GiB" in msg


def test_lowercase_bits_error_says_what_to_write():
    with pytest.raises(BudgetError, match="write GB"):
        parse_size("20gb")


def test_budget_error_is_a_value_error():
    assert issubclass(BudgetError, ValueError)


@pytest.mark.parametrize(
    "nbytes, text",
    [
        (19_870_000_000, "19.87 GB"),
        (512 * 10**6, "512.00 MB"),
        (1_500, "1.50 KB"),
        (999, "999 B"),
        (0, "0 B"),
        (2 * 10**12, "2.00 TB"),
        (-3 * 10**9, "-3.00 GB"),
    ],
)
def test_format_size(nbytes, text):
    assert format_size(nbytes) == text


def test_format_size_reads_back_within_rounding():
    for nbytes in (123_456_789, 20 * 2**30, 7_777):
        back = parse_size(format_size(nbytes).replace(" ", ""))
        assert abs(back - nbytes) <= 0.005 * nbytes


def test_mxfp4_plan_and_aot_byte_model_count_4_25_bits_per_expert_value():
    """gpt-oss-20b's MXFP4 fallback: half a byte per value and a byte per 32, exactly what
    `quant.Mxfp4Tensor` holds, in the plan and in the AOT byte model's abstract experts."""
    import jax.numpy as jnp

    from dynaexq_jax.experts.expert_state import weights_nbytes
    from dynaexq_jax.experts.quant import Mxfp4Tensor, quantize_mxfp4
    from dynaexq_jax.runtime import aot

    from test_families import PUBLISHED

    t = quantize_mxfp4(jnp.zeros((3, 64, 16)))
    assert budget.quantized_nbytes((3, 64, 16), budget.MXFP4, 128) == t.nbytes == 3 * 64 * 16 * 4.25 / 8
    d = PUBLISHED["gpt-oss-20b"]
    cfg = registry.adapter_for(d).config_from_hf(d)
    plan = budget.policy_plan(cfg, "static", budget=None, batch=1, prompt=128, context=1024, dtype_itemsize=2,
                              lo_bits=budget.MXFP4, hi_dtype="bfloat16", group_size=128)
    values = len(cfg.moe_layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert plan.lo_bits == budget.MXFP4 and plan.fallback * 8 == values * 4.25
    state = aot.abstract_experts(cfg, "static", plan, dtype=jnp.bfloat16, hi_dtype="bfloat16", group=128)
    (tier,) = state.tiers
    assert isinstance(tier.gate_up, Mxfp4Tensor)
    assert weights_nbytes(tier.gate_up) + weights_nbytes(tier.down) == plan.fallback
    assert aot.expert_bytes(cfg, budget.MXFP4, 2, 128) * len(cfg.moe_layers) * cfg.num_experts == plan.fallback
    with pytest.raises(budget.BudgetError, match="cannot hold the mxfp4 fallback"):
        budget.policy_plan(cfg, "static", budget=plan.minimum - 1, batch=1, prompt=128, context=1024,
                           dtype_itemsize=2, lo_bits=budget.MXFP4, hi_dtype="bfloat16", group_size=128)


def test_a_dynaexq_plan_holds_its_promotions_copies_and_budget_for_gives_exactly_that_many_slots():
    """The promotions in flight (`STAGING_EXPERTS` copies, each with its slot layout while it
    lands) are part of a dynaexq plan with slots, so the allocator's peak stays in the budget; a
    plan without slots, or a policy that never promotes, holds none."""
    from dynaexq_jax.io.preset import preset_config

    cfg = preset_config("qwen3-30b-a3b")
    kw = dict(batch=1, prompt=128, context=1024, dtype_itemsize=2, lo_bits=4, hi_dtype="bfloat16", group_size=128)
    probe = budget.policy_plan(cfg, "dynaexq", budget=None, **kw)
    assert probe.staging == budget.staging_nbytes(probe.slot_bytes) == 2 * budget.STAGING_EXPERTS * probe.slot_bytes
    for n in (1, 128):
        plan = budget.policy_plan(cfg, "dynaexq", budget=probe.budget_for(n), **kw)
        assert plan.slots == n and plan.total == probe.budget_for(n) and plan.staging == probe.staging
        assert f"promotion staging ({budget.STAGING_EXPERTS} experts in flight)" in plan.table()
    short = budget.policy_plan(cfg, "dynaexq", budget=probe.budget_for(1) - 1, **kw)
    assert short.slots == 0 and short.staging == 0 and short.total <= probe.budget_for(1) - 1
    assert budget.policy_plan(cfg, "static", budget=None, **kw).staging == 0
    assert budget.policy_plan(cfg, "full", budget=None, **kw).staging == 0  # every expert placed, none promoted
