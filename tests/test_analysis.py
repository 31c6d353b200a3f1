"""Representation similarity: linear CKA (biased, debiased, streaming), SVCCA and PWCCA, each
checked against an independent numpy implementation written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from residtap.analysis import (
    ConstantActivationsError,
    LinearCKA,
    canonical_correlations,
    layer_similarity,
    linear_cka,
    pwcca,
    svcca,
)

# ---------------------------------------------------------------------------------------------
# numpy oracles (sample space, straight from the formulas)


def hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n)
    term1 = np.trace(Kt @ Lt)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def cka_oracle(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    K, L = X @ X.T, Y @ Y.T
    hsic = hsic_unbiased if debiased else hsic_biased
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def inv_sqrt(C: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(C)
    return V @ np.diag(w**-0.5) @ V.T


def cca_oracle(X: np.ndarray, Y: np.ndarray):
    """Canonical correlations and x-side variates via covariance whitening."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Sxx, Syy, Sxy = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    Wx, Wy = inv_sqrt(Sxx), inv_sqrt(Syy)
    U, rho, Vt = np.linalg.svd(Wx @ Sxy @ Wy)
    k = min(X.shape[1], Y.shape[1])
    hx = Xc @ Wx @ U[:, :k]
    hy = Yc @ Wy @ Vt.T[:, :k]
    return rho[:k], hx / np.linalg.norm(hx, axis=0), hy / np.linalg.norm(hy, axis=0)


def svcca_oracle(X: np.ndarray, Y: np.ndarray, keep: float = 0.99) -> float:
    reduced = []
    for A in (X, Y):
        Ac = A - A.mean(0)
        U, s, _ = np.linalg.svd(Ac, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(frac, keep) + 1)
        reduced.append(U[:, :k] * s[:k])
    return float(cca_oracle(*reduced)[0].mean())


def pwcca_oracle(X: np.ndarray, Y: np.ndarray) -> float:
    rho, hx, hy = cca_oracle(X, Y)
    h, A = (hx, X) if X.shape[1] <= Y.shape[1] else (hy, Y)
    alpha = np.abs(h.T @ (A - A.mean(0))).sum(axis=1)
    return float((alpha / alpha.sum()) @ rho)


def related(n: int, dx: int, dy: int, seed: int, noise: float = 1.0):
    """Two views sharing a 5-dim latent, with unequal feature scales."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    X = z @ rng.normal(size=(5, dx)) + noise * rng.normal(size=(n, dx))
    Y = z @ rng.normal(size=(5, dy)) + noise * rng.normal(size=(n, dy))
    return X * rng.uniform(0.5, 3, size=dx), Y * rng.uniform(0.5, 3, size=dy)


# ---------------------------------------------------------------------------------------------
# CKA


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "dx", "dy"), [(200, 20, 30), (40, 60, 50)])  # feature / Gram path
def test_cka_equals_the_hsic_formula(n, dx, dy, debiased):
    X, Y = related(n, dx, dy, seed=n)
    expected = cka_oracle(X, Y, debiased)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert linear_cka(torch.tensor(X).float(), torch.tensor(Y).float(), debiased=debiased) == (
        pytest.approx(expected, rel=1e-5, abs=1e-6)
    )


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances_and_identity(debiased):
    X, Y = related(150, 12, 18, seed=1)
    Q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 12)))
    base = linear_cka(X, Y, debiased=debiased)
    assert linear_cka(X @ Q, Y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X + 100.0, Y, debiased=debiased) == pytest.approx(base, rel=1e-8)
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(X, X @ Q * 2.0, debiased=debiased) == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "dx", "dy"), [(300, 16, 24), (60, 80, 70)])
def test_streaming_equals_in_memory(n, dx, dy, debiased):
    X, Y = related(n, dx, dy, seed=3)
    X, Y = X + 1e3, Y - 5e2  # large offsets: the shift keeps float64 sums precise
    acc = LinearCKA()
    for start, stop in [(0, 7), (7, 40), (40, 41), (41, n)]:  # uneven batches
        acc.update(torch.tensor(X[start:stop]), torch.tensor(Y[start:stop]))
    assert acc.n == n
    expected = linear_cka(X, Y, debiased=debiased)
    assert acc.value(debiased=debiased) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # both estimators are shift invariant; the oracle's uncentred Gram matrices with offsets of
    # 1e3 would lose ~6 digits to cancellation, so it gets the centred data
    oracle = cka_oracle(X - X.mean(0), Y - Y.mean(0), debiased)
    assert expected == pytest.approx(oracle, rel=1e-9, abs=1e-12)


def test_debiased_cka_is_centred_on_zero_for_independent_data():
    rng = np.random.default_rng(0)
    biased, debiased = [], []
    for _ in range(60):
        X, Y = rng.normal(size=(40, 64)), rng.normal(size=(40, 64))
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert np.mean(biased) > 0.5  # small N, wide features: biased CKA is far from 0
    assert abs(np.mean(debiased)) < 4 * np.std(debiased) / np.sqrt(60) + 0.005


def test_cka_errors_are_clear():
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(np.zeros((10, 3)), np.zeros((9, 3)))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(np.zeros(10), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 4 rows"):
        LinearCKA().value(debiased=True)


# ---------------------------------------------------------------------------------------------
# CCA family


def test_canonical_correlations_match_whitening_oracle():
    X, Y = related(500, 10, 14, seed=4)
    ours = canonical_correlations(torch.tensor(X), torch.tensor(Y)).numpy()
    np.testing.assert_allclose(ours, cca_oracle(X, Y)[0], atol=1e-6)


@pytest.mark.parametrize(("dx", "dy"), [(20, 30), (30, 20)])
def test_svcca_and_pwcca_match_numpy(dx, dy):
    X, Y = related(600, dx, dy, seed=5, noise=0.3)
    assert svcca(X, Y) == pytest.approx(svcca_oracle(X, Y), abs=1e-6)
    assert svcca(X, Y, keep=0.9) == pytest.approx(svcca_oracle(X, Y, keep=0.9), abs=1e-6)
    assert pwcca(X, Y) == pytest.approx(pwcca_oracle(X, Y), abs=1e-6)


def test_cca_similarities_of_invertible_transforms_are_one():
    X, _ = related(400, 8, 8, seed=6)
    A = np.random.default_rng(7).normal(size=(8, 8))
    np.testing.assert_allclose(canonical_correlations(X, X @ A + 3.0).numpy(), 1.0, atol=1e-8)
    assert svcca(X, X @ A) == pytest.approx(1.0, abs=1e-8)
    assert pwcca(X, X @ A) == pytest.approx(1.0, abs=1e-8)


def test_cca_refuses_too_few_rows():
    X, Y = related(30, 20, 20, seed=8)
    with pytest.raises(ValueError, match="more rows than dimensions"):
        pwcca(X, Y)
    with pytest.raises(ValueError, match="keep must be"):
        svcca(X, Y, keep=1.5)


# ---------------------------------------------------------------------------------------------
# layer_similarity


def test_layer_similarity_matrix():
    X, Y = related(300, 12, 16, seed=9)
    acts = {"layers.0": torch.tensor(X), "layers.1": torch.tensor(Y)}
    sim = layer_similarity(acts, method="cka")
    assert sim.shape == (2, 2) and sim.dtype == torch.float64
    torch.testing.assert_close(sim.diagonal(), torch.ones(2, dtype=torch.float64))
    assert float(sim[0, 1]) == pytest.approx(linear_cka(X, Y))
    other = {"a": torch.tensor(X[:, :5])}
    assert layer_similarity(acts, other, method="pwcca").shape == (2, 1)
    assert float(layer_similarity(acts, other, method="svcca")[0, 0]) == pytest.approx(
        svcca(X, X[:, :5])
    )
    with pytest.raises(ValueError, match="unknown method"):
        layer_similarity(acts, method="rsa")


# ---------------------------------------------------------------------------------------------
# a constant site: CKA is NaN, named once; SVCCA / PWCCA refuse it by name


def _sites_with_a_constant_one(n: int = 120, seed: int = 10) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    acts = {"embed": torch.full((n, 6), 0.5, dtype=torch.float64)}  # e.g. one shared last token
    acts |= {f"layers.{i}": torch.tensor(rng.normal(size=(n, 6))) for i in range(6)}
    return acts


def test_a_constant_site_gives_nan_cka_and_one_warning_naming_it(caplog):
    acts = _sites_with_a_constant_one()
    with caplog.at_level("DEBUG", logger="residtap"):
        sim = layer_similarity(acts, method="cka")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "site(s) 'embed'" in warnings[0].getMessage()
    assert sim[0].isnan().all() and sim[:, 0].isnan().all()
    assert torch.isfinite(sim[1:, 1:]).all()
    assert linear_cka(acts["embed"], acts["layers.0"]) != linear_cka(acts["embed"],
                                                                      acts["layers.0"])  # NaN


@pytest.mark.parametrize("method", ["svcca", "pwcca"])
def test_cca_on_a_constant_site_fails_naming_it(method):
    acts = _sites_with_a_constant_one()
    fn = svcca if method == "svcca" else pwcca
    with pytest.raises(ConstantActivationsError, match="y is constant over its 120 rows"):
        fn(acts["layers.0"], acts["embed"])
    with pytest.raises(ValueError, match=f"{method}: site 'embed' is constant over its 120 rows"):
        layer_similarity(acts, method=method)
    others = {k: v for k, v in acts.items() if k != "embed"}
    with pytest.raises(ValueError, match="site 'embed' is constant"):
        layer_similarity(others, {"embed": acts["embed"]}, method=method)


def test_compare_stores_names_a_constant_site(tmp_path, caplog):
    """`residtap compare` on a store whose 'embed' site is constant (every text ends with the
    same token): one warning line for CKA, an error naming the site for SVCCA."""
    from conftest import tiny_model

    import residtap
    from residtap.analysis import store_similarity

    rows = [{"id": f"t{i}", "input_ids": [5 + i % 11, 9 + i % 3, 70], "label": i % 2}
            for i in range(48)]
    store = residtap.extract(tiny_model("llama", layers=6), None, rows,
                             ["embed", *(f"layers.{i}" for i in range(6))], tmp_path / "s",
                             positions="last", progress=False)
    with caplog.at_level("DEBUG", logger="residtap"):
        result = store_similarity(store, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["cka is undefined (NaN) for site(s) 'embed': constant over the rows, "
                        "or too few rows for the debiased estimator"]
    assert result.matrix[0].isnan().all() and torch.isfinite(result.matrix[1:, 1:]).all()
    with pytest.raises(ValueError, match=r"svcca: site 'embed' of .*s is constant over its 48"):
        store_similarity(store, method="svcca", progress=False)
