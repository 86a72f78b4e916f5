import numpy as np
import pytest

from dynaexq_jax.budget import BudgetError, format_size, parse_size


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
