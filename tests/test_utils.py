"""compresscnn.util.common helpers that the other modules' tests do not reach directly."""

import math

import numpy as np

from compresscnn.util.common import fmt_quantity


def test_fmt_quantity_counts_and_sizes_share_one_format():
    assert fmt_quantity(25_557_032) == "25.56 M"
    assert fmt_quantity(4.1e9) == "4.10 G"
    assert fmt_quantity(1234) == "1.23 k"
    assert fmt_quantity(999) == "999"
    assert fmt_quantity(-2_000_000) == "-2.00 M"
    assert fmt_quantity(1_234_567, "B") == "1.23 MB"
    assert fmt_quantity(244_000_000, "B") == "244.00 MB"
    assert fmt_quantity(512, "B") == "512 B"
    assert fmt_quantity(np.int64(3_000)) == "3.00 k"


def test_fmt_quantity_missing_values():
    for v in (None, True, math.nan, math.inf, "12"):
        assert fmt_quantity(v) == "-"
    assert fmt_quantity(None, "B", missing="—") == "—"
