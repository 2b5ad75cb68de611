"""The fused linear + cross-entropy (``tuneforge.kernels.linear_cross_entropy``): the compiled CPU op and its chunked
pure-torch twin against ``F.cross_entropy(hidden @ W.T + b, y)`` in float64, forward and gradients, on shapes whose
rows are not a multiple of the chunk and whose vocabulary is not a multiple of a vector width; gradcheck, opcheck,
autocast and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from tuneforge import kernels
from tuneforge.kernels import native
from tuneforge.kernels.reference import linear_cross_entropy_reference

COMPILED = native.load()
needs_compiled = pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded")
IGNORE = -100


def _inputs(N, C, V, *, bias=True, ignored=0.25, dtype=torch.float64, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*(shape or (N,)), C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64) / C ** 0.5 * 3  # logits of a few units: a real softmax
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, h.shape[:-1], generator=g)
    t[torch.rand(t.shape, generator=g) < ignored] = IGNORE
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return cast(h), cast(w), t, cast(b)


def _truth(h, w, t, b, *, reduction="mean", label_smoothing=0.0):
    """F.cross_entropy on the whole float64 logits; mean over no row at all is 0 (F.cross_entropy gives NaN)."""
    logits = F.linear(h.double(), w.double(), None if b is None else b.double())
    loss = F.cross_entropy(logits.reshape(-1, w.size(0)), t.reshape(-1), ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction="sum" if reduction == "mean" else reduction)
    if reduction == "mean":
        loss = loss / (t != IGNORE).sum().clamp(min=1)
    return loss.reshape(t.shape) if reduction == "none" else loss


def _compiled(chunk):
    def run(h, w, t, b, **kw):
        needs = [x is not None and x.requires_grad for x in (h, w, b)]
        return torch.ops.tuneforge.linear_cross_entropy(h, w, b, t, IGNORE, kw.get("label_smoothing", 0.0),
                                                        kw.get("reduction", "mean"), needs, chunk)[0]
    return run


PATHS = {
    "face": lambda h, w, t, b, **kw: kernels.linear_cross_entropy(h, w, t, b, ignore_index=IGNORE, **kw),
    "op-chunk5": _compiled(5),
    "reference-chunk5": lambda h, w, t, b, **kw: linear_cross_entropy_reference(h, w, t, b, ignore_index=IGNORE,
                                                                                chunk_rows=5, **kw),
    "reference": lambda h, w, t, b, **kw: linear_cross_entropy_reference(h, w, t, b, ignore_index=IGNORE, **kw),
}


def _run(fn, inputs, seed=1, **kw):
    """Loss and the gradients of every input that requires one, after a backward with a random upstream grad."""
    h, w, t, b = inputs
    loss = fn(h, w, t, b, **kw)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(loss.dtype)
    loss.backward(up)
    grads = [x.grad for x in (h, w, b) if x is not None]
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    return loss, grads


def _check_against_truth(path, inputs, rtol=1e-9, atol=1e-10, **kw):
    if path.startswith("op") and not COMPILED:
        pytest.skip("compiled kernels not loaded")
    got, got_grads = _run(PATHS[path], inputs, **kw)
    want, want_grads = _run(_truth, inputs, **kw)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert len(got_grads) == len(want_grads)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N, C, V, bias, eps", [(37, 24, 67, True, 0.0), (23, 9, 13, False, 0.1),
                                                 (1, 5, 3, True, 0.3), (16, 17, 33, False, 0.0)])
def test_loss_and_gradients_match_cross_entropy_on_the_whole_logits(path, reduction, N, C, V, bias, eps):
    _check_against_truth(path, _inputs(N, C, V, bias=bias, seed=N), reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("path", ["face", "op-chunk5"])
@pytest.mark.parametrize("V, spread", [(7, 3), (16, 3), (37, 30), (259, 3), (1000, 300)])
def test_float32_rows_match_in_every_vector_tail(path, V, spread):
    """float32 runs the vectorised row pass (8 lanes, a polynomial exp, scalar tails); spread 300 pushes most
    exponents below float32's range (exactly 0, never NaN)."""
    if path.startswith("op") and not COMPILED:
        pytest.skip("compiled kernels not loaded")
    exact = _inputs(19, 16, V, seed=V)
    with torch.no_grad():
        exact[1].mul_(spread / 3)
    low = [x if not x.is_floating_point() else x.detach().float().requires_grad_() for x in exact]
    for reduction in ("mean", "none"):
        got, got_grads = _run(PATHS[path], low, reduction=reduction, label_smoothing=0.05)
        want, want_grads = _run(_truth, exact, reduction=reduction, label_smoothing=0.05)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * spread)
        for a, e in zip(got_grads, want_grads):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=2e-5 * e.abs().max())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_gives_zero_loss_and_zero_gradients_not_nan(path, reduction):
    inputs = _inputs(11, 8, 19, ignored=1.1)
    _check_against_truth(path, inputs, reduction=reduction, label_smoothing=0.1)
    loss, grads = _run(PATHS[path] if COMPILED or not path.startswith("op") else PATHS["reference"], inputs,
                       reduction=reduction)
    assert not loss.any() and all(not g.any() for g in grads)


@pytest.mark.parametrize("path", ["face", "reference-chunk5"])
def test_no_rows_at_all(path):
    h, w, t, b = _inputs(0, 8, 19)
    loss, grads = _run(PATHS[path], (h, w, t, b))
    assert loss.item() == 0 and grads[0].shape == (0, 8) and not grads[1].any()


@pytest.mark.parametrize("path", ["face", "reference"])
def test_leading_dimensions_and_token_logprobs(path):
    h, w, t, b = _inputs(0, 12, 29, shape=(3, 7), seed=3)
    with torch.no_grad():
        out = PATHS[path](h, w, t, b, reduction="none")
        assert out.shape == (3, 7)
        logp = torch.log_softmax(F.linear(h, w, b), -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
        want = logp.masked_fill(t == IGNORE, 0)
        torch.testing.assert_close(-out, want)
        torch.testing.assert_close(kernels.linear_token_logprobs(h, w, t, b, ignore_index=IGNORE), want)


@pytest.mark.parametrize("path", ["face", "op-chunk5", "reference-chunk5"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_in_float64(path, reduction):
    if path.startswith("op") and not COMPILED:
        pytest.skip("compiled kernels not loaded")
    h, w, t, b = _inputs(7, 4, 6, seed=7)
    fn = PATHS[path]
    assert torch.autograd.gradcheck(lambda h, w, b: fn(h, w, t, b, reduction=reduction, label_smoothing=0.2),
                                    (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["face", "op-chunk5", "reference-chunk5"])
def test_narrow_dtypes_accumulate_in_float32_and_return_gradients_in_their_dtype(dtype, path):
    if path.startswith("op") and not COMPILED:
        pytest.skip("compiled kernels not loaded")
    exact = _inputs(45, 32, 131, seed=5)
    low = [x if not x.is_floating_point() else x.detach().to(dtype).requires_grad_() for x in exact]
    kw = dict(reduction="mean", label_smoothing=0.1)
    got, got_grads = _run(PATHS[path], low, **kw)
    want, want_grads = _run(_truth, exact, **kw)

    def unfused(h, w, t, b, **kw):  # what a user writes in this dtype: logits and log-softmax in it
        return F.cross_entropy(F.linear(h, w, b), t, ignore_index=IGNORE, **kw)

    base, base_grads = _run(unfused, [x if not x.is_floating_point() else x.detach().requires_grad_() for x in low],
                            **kw)
    assert got.dtype == torch.float32 and [g.dtype for g in got_grads] == [dtype] * 3
    for a, e, yard in zip([got, *got_grads], [want, *want_grads], [base, *base_grads]):
        err, yard_err = (a.double() - e).abs().max(), (yard.double() - e).abs().max()
        assert err <= 2 * yard_err + 1e-6 * e.abs().max(), (err, yard_err)


@pytest.mark.parametrize("path", ["face", "reference"])
def test_autocast_casts_like_f_linear_and_keeps_a_float32_loss(path):
    h, w, t, b = _inputs(21, 16, 40, dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "reference":  # the face casts before either path runs; here the twin gets what the face gives
            with kernels.reference_only():
                loss = kernels.linear_cross_entropy(h, w, t, b, ignore_index=IGNORE)
        else:
            loss = kernels.linear_cross_entropy(h, w, t, b, ignore_index=IGNORE)
        logits = F.linear(h, w, b)
        assert logits.dtype == torch.bfloat16
    want = F.cross_entropy(logits.float(), t, ignore_index=IGNORE)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    assert h.grad.abs().sum() > 0


@needs_compiled
def test_the_face_runs_the_compiled_op_on_the_cpu_and_reference_only_the_twin(monkeypatch):
    assert kernels.routes()["linear_cross_entropy"]["cpu"][0] == "cpp"
    calls = []
    real = torch.ops.tuneforge.linear_cross_entropy
    monkeypatch.setattr(kernels.linear_ce.torch.ops.tuneforge, "linear_cross_entropy",
                        lambda *a: calls.append(a[7]) or real(*a), raising=False)
    h, w, t, b = _inputs(9, 8, 10, dtype=torch.float32)
    kernels.linear_cross_entropy(h, w.detach(), t, b)
    assert calls == [[True, False, True]]  # gradients made only for the inputs that require one
    with torch.no_grad():
        kernels.linear_cross_entropy(h, w, t, b)
    assert calls[-1] == [False, False, False]
    with kernels.reference_only():
        kernels.linear_cross_entropy(h, w, t, b)
    assert len(calls) == 2


@needs_compiled
def test_without_gradients_the_op_makes_none_and_a_retained_graph_gives_the_same_gradients_twice():
    h, w, t, b = _inputs(9, 8, 10)
    out = torch.ops.tuneforge.linear_cross_entropy(h, w, b, t, IGNORE, 0.0, "mean", [False] * 3, 0)
    assert all(g.numel() == 0 for g in out[1:])
    loss = kernels.linear_cross_entropy(h, w, t, b)
    first = torch.autograd.grad(loss, (h, w, b), retain_graph=True)  # upstream 1: the saved gradients as they are
    second = torch.autograd.grad(loss * 3, (h, w, b))
    for a, c in zip(first, second):
        torch.testing.assert_close(3 * a, c)


@needs_compiled
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(reduction, bias):
    h, w, t, b = _inputs(13, 6, 11, bias=bias, dtype=torch.float32)
    needs = [True, True, bias]
    torch.library.opcheck(torch.ops.tuneforge.linear_cross_entropy.default,
                          (h, w, b, t, IGNORE, 0.1, reduction, needs, 4))
    grad = torch.randn(13)
    torch.library.opcheck(torch.ops.tuneforge.linear_cross_entropy_backward.default,
                          (grad, h.detach(), w.detach(), None if b is None else b.detach(), t, IGNORE, 0.1, needs, 4))


@pytest.mark.parametrize("change, error, match", [
    (lambda h, w, t, b: (h, w[:, :-1], t, b), ValueError, "same C"),
    (lambda h, w, t, b: (h, w, t[:-1], b), ValueError, "leading shape"),
    (lambda h, w, t, b: (h, w, t, b[:-1]), ValueError, r"bias must be \(V,\)"),
    (lambda h, w, t, b: (h, w.double(), t, b), TypeError, "one dtype"),
    (lambda h, w, t, b: (h, w, t.float(), b), TypeError, "class indices"),
    (lambda h, w, t, b: (h.long(), w, t, b), TypeError, "floating point"),
    (lambda h, w, t, b: (h, w, torch.full_like(t, 10), b), ValueError, r"target 10 is outside the vocabulary \[0, 10\)"),
    (lambda h, w, t, b: (h, w, torch.full_like(t, -1), b), ValueError, "not ignore_index"),
    (lambda h, w, t, b: (h, w.to("meta"), t, b), ValueError, "one device"),
])
def test_bad_inputs_say_what_is_wrong(change, error, match):
    h, w, t, b = (x.detach() for x in _inputs(6, 8, 10, dtype=torch.float32, ignored=0))
    with pytest.raises(error, match=match):
        kernels.linear_cross_entropy(*change(h, w, t, b))


@needs_compiled
def test_the_op_itself_refuses_a_target_outside_the_vocabulary():
    h, w, t, b = (x.detach() for x in _inputs(6, 8, 10, dtype=torch.float32, ignored=0))
    t[3] = 10
    with pytest.raises(RuntimeError, match="target 10 at row 3 is outside"):
        torch.ops.tuneforge.linear_cross_entropy(h, w, b, t, IGNORE, 0.0, "mean", [False] * 3, 0)


@pytest.mark.parametrize("kw, match", [({"reduction": "avg"}, "reduction"), ({"label_smoothing": 1.5}, "label_smoothing")])
def test_bad_options_say_what_is_wrong(kw, match):
    h, w, t, b = (x.detach() for x in _inputs(6, 8, 10, dtype=torch.float32))
    with pytest.raises(ValueError, match=match):
        kernels.linear_cross_entropy(h, w, t, b, **kw)
