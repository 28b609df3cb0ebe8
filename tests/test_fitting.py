"""Fitting primitives against independent oracles: im2col times the kernel is ONNX Runtime's Conv, the
streamed moments equal the one-shot products, ridge at λ=0 is numpy's least squares."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F32, make_model, run_ort
from onnx import helper

from onnxopt.analysis import fitting
from onnxopt.analysis.fitting import Moments, im2col, ridge_solve
from onnxopt.analysis.layers import conv_geometry

RNG = np.random.default_rng(3)

CASES = {
    "1d": ((4, 3, 5), (2, 3, 17), dict(strides=[2], dilations=[2], pads=[3, 1])),
    "2d": ((5, 3, 3, 2), (2, 3, 8, 9), dict(strides=[2, 1], pads=[1, 0, 2, 1])),
    "2d_dilated": ((5, 2, 3, 3), (1, 2, 11, 10), dict(dilations=[2, 3], strides=[1, 2])),
    "2d_same_upper": ((4, 3, 3, 3), (1, 3, 8, 7), dict(auto_pad="SAME_UPPER", strides=[2, 3])),
    "2d_same_lower": ((4, 3, 4, 2), (1, 3, 7, 6), dict(auto_pad="SAME_LOWER", strides=[3, 2])),
    "2d_valid": ((4, 3, 3, 3), (2, 3, 6, 9), dict(auto_pad="VALID", strides=[1, 2])),
    "3d": ((3, 2, 2, 3, 2), (1, 2, 5, 6, 7), dict(strides=[2, 1, 3], pads=[0, 1, 1, 1, 0, 0])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_im2col_times_the_kernel_is_onnxruntime_conv(case: str) -> None:
    w_shape, x_shape, attrs = CASES[case]
    w = RNG.normal(size=w_shape).astype(np.float32)
    x = RNG.normal(size=x_shape).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [("x", F32, list(x_shape))],
                       [("y", F32, None)], {"w": w})
    y = run_ort(proto, {"x": x})[0]
    geometry = conv_geometry(ir.from_proto(proto).graph.node(0), w_shape)
    cols = geometry.unfold(x)
    got = (cols @ w.reshape(w_shape[0], -1).T).reshape(y.shape[0], *y.shape[2:], w_shape[0])
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), y, rtol=1e-4, atol=1e-4)
    if geometry.auto_pad == "NOTSET":  # the plain function with the declared pads is the same unfolding
        np.testing.assert_array_equal(im2col(x, geometry.kernel, geometry.strides, geometry.dilations,
                                             geometry.pads), cols)


def test_im2col_negative_pads_crop() -> None:
    x = RNG.normal(size=(2, 3, 7, 6))
    np.testing.assert_array_equal(im2col(x, (2, 3), pads=(-1, 0, 0, -2)), im2col(x[:, :, 1:, :4], (2, 3)))


def _rows(n: int, f: int) -> np.ndarray:
    return RNG.normal(size=(n, f)) * RNG.uniform(0.1, 3.0, size=f)


@pytest.mark.parametrize("groups", [1, 3])
def test_streamed_moments_equal_the_one_shot_products(groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fitting, "CHUNK_ROWS", 7)  # batches are split in chunks too
    f, t = 4, 5
    batches = [(_rows(n, groups * f).astype(np.float32), _rows(n, t)) for n in (10, 3, 25)]
    m = Moments(f, t, groups=groups, intercept=True)
    for x, y in batches:
        m.add(x, y)
    x_all = np.concatenate([b[0] for b in batches]).astype(np.float64)
    y_all = np.concatenate([b[1] for b in batches])
    assert m.n == x_all.shape[0] and m.features == f and m.dim == f + 1
    for g in range(groups):
        xt = np.concatenate([x_all[:, g * f : (g + 1) * f], np.ones((m.n, 1))], axis=1)
        np.testing.assert_allclose(m.G[g], xt.T @ xt, rtol=1e-12)
        np.testing.assert_allclose(m.H[g], xt.T @ y_all, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.q, (y_all**2).sum(axis=0), rtol=1e-12)
    half = Moments(f, t, groups=groups, intercept=True)
    half.add(*batches[0])
    rest = Moments(f, t, groups=groups, intercept=True)
    for x, y in batches[1:]:
        rest.add(x, y)
    both = half.merged(rest)
    np.testing.assert_allclose(both.G, m.G, rtol=1e-12)
    assert both.n == m.n


def test_second_moment_without_targets_and_with_a_gram_block() -> None:
    x = _rows(40, 6)
    m = Moments(6)
    m.add(x[:25])
    m.add_gram(x[25:].T @ x[25:], 15)
    np.testing.assert_allclose(m.second_moment(), x.T @ x / 40, rtol=1e-12)
    assert Moments(3).second_moment() is None


def test_ridge_at_zero_is_least_squares_and_penalizes_like_the_augmented_system() -> None:
    x, y = _rows(60, 5), _rows(60, 3)
    m = Moments(5, 3, intercept=True)
    m.add(x, y)
    xt = np.concatenate([x, np.ones((60, 1))], axis=1)
    np.testing.assert_allclose(m.solve(0.0), np.linalg.lstsq(xt, y, rcond=None)[0], rtol=1e-8, atol=1e-10)
    lam = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 0.0])  # no penalty on the intercept
    augmented = np.concatenate([xt, np.diag(np.sqrt(lam))]), np.concatenate([y, np.zeros((6, 3))])
    np.testing.assert_allclose(ridge_solve(m.G[0], m.H[0], lam), np.linalg.lstsq(*augmented, rcond=None)[0],
                               rtol=1e-8, atol=1e-10)
    assert m.ridge(0.5) == pytest.approx(0.5 * np.mean((x**2).sum(axis=0)))


def test_ridge_solve_of_a_singular_system_falls_back_to_least_squares() -> None:
    x = _rows(20, 2)
    x = np.concatenate([x, x[:, :1]], axis=1)  # a repeated column: XᵀX is singular
    y = _rows(20, 1)
    theta = ridge_solve(x.T @ x, x.T @ y, 0.0)
    np.testing.assert_allclose(x @ theta, x @ np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-6, atol=1e-8)
