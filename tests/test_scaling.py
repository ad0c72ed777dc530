"""The scaling study's power-law fit: it recovers a, alpha and c from points made with them, and says how far off
the points it was given are."""

import math

import pytest

from studies.scaling import fit_power_law, power_law


@pytest.mark.parametrize("a, alpha, c", [(40.0, 0.3, 4.5), (900.0, 0.55, 5.2), (12.0, 0.12, 3.0)])
def test_the_fit_recovers_the_law_it_was_made_from(a, alpha, c):
    sizes = [28_000 * 2 ** k for k in range(6)]
    fit = fit_power_law(sizes, [a * size ** -alpha + c for size in sizes])
    assert fit["a"] == pytest.approx(a, rel=1e-4) and fit["alpha"] == pytest.approx(alpha, rel=1e-4)
    assert fit["c"] == pytest.approx(c, rel=1e-5) and fit["rms_residual"] < 1e-8
    assert power_law(fit, 10**7) == pytest.approx(a * 1e7 ** -alpha + c, rel=1e-6)  # a prediction past the range


def test_the_residuals_are_the_points_minus_the_fit():
    sizes = [30_000, 60_000, 120_000, 240_000, 480_000]
    noise = [0.01, -0.02, 0.015, -0.005, 0.0]
    losses = [50.0 * size ** -0.35 + 4.8 + e for size, e in zip(sizes, noise)]
    fit = fit_power_law(sizes, losses)
    assert fit["residuals"] == pytest.approx([loss - power_law(fit, size) for size, loss in zip(sizes, losses)], abs=1e-9)
    assert fit["rms_residual"] == pytest.approx(math.sqrt(sum(r * r for r in fit["residuals"]) / 5))
    assert fit["rms_residual"] <= math.sqrt(sum(e * e for e in noise) / 5) + 1e-9  # no worse than the true law


def test_the_floor_is_never_negative():
    """Points that a line in log-log fits best (no floor at all) give c = 0, not a negative loss floor."""
    sizes = [30_000, 60_000, 120_000, 240_000]
    fit = fit_power_law(sizes, [9.6 * size ** -0.09 for size in sizes])
    # 0 to float rounding (one CPU gives exactly 0, another 5.6e-15), and never below it
    assert 0.0 <= fit["c"] < 1e-9 and fit["alpha"] == pytest.approx(0.09, rel=1e-4) and fit["a"] == pytest.approx(9.6, rel=1e-4)


def test_three_points_at_least():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_power_law([1e4, 2e4], [6.0, 5.5])
