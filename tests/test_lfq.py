"""LFQ: the soft-CE objective, its chunking, gradients into the grid, and the engine end to end."""

import pytest
import torch
from torch import nn

from lfq_export.grids import AffineGrid
from lfq_export.lfq_loss import LogitHead, chunked_soft_ce_backward, soft_ce
from lfq_export.methods import METHODS, MethodConfig
from lfq_export.quantize import QuantizeOptions, quantize
from lfq_export.record import QuantizedModel


class _RMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def _head(d=16, v=50, seed=0):
    torch.manual_seed(seed)
    return LogitHead(_RMS(d), torch.randn(v, d))


def test_ce_equals_kl_plus_teacher_entropy():
    head = _head()
    hq, hf = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    ce = soft_ce(head, hq, hf)
    lp = torch.log_softmax(head(hf), -1)
    lq = torch.log_softmax(head(hq), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    ent = -(lp.exp() * lp).sum(-1).mean()
    assert torch.allclose(ce, kl + ent, atol=1e-5)
    _, stats = chunked_soft_ce_backward(head, hq, hf, chunk_tokens=3, backward=False)
    m = stats.means()
    assert abs(m["kl"] - float(kl)) < 1e-4 and abs(m["ce"] - float(ce)) < 1e-4


@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
def test_chunked_matches_unchunked_loss_and_grad(chunk):
    head = _head()
    w = torch.randn(16, 16, requires_grad=True)
    x, hf = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0  # padding is excluded from the mean
    ref = soft_ce(head, x @ w, hf, mask)
    (g_ref,) = torch.autograd.grad(ref, w)
    loss, stats = chunked_soft_ce_backward(head, x @ w, hf, mask, chunk_tokens=chunk)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(w.grad, g_ref, atol=1e-6)
    assert stats.tokens == 13
    assert head.weight.grad is None and all(p.grad is None for p in head.norm.parameters())


def test_cached_teacher_and_bf16_gradient_are_close():
    from lfq_export.lfq_loss import teacher_log_probs

    head = _head(d=32, v=300)
    w = torch.randn(32, 32, requires_grad=True)
    x, hf = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    ref, _ = chunked_soft_ce_backward(head, x @ w, hf, chunk_tokens=4)
    g_ref = w.grad.clone()
    w.grad = None
    loss, _ = chunked_soft_ce_backward(head, x @ w, hf, chunk_tokens=4, teacher_logp=teacher_log_probs(head, hf),
                                       grad_dtype=torch.bfloat16)
    assert abs(float(loss) - float(ref)) < 1e-3 * float(ref)
    cos = torch.nn.functional.cosine_similarity(w.grad.flatten(), g_ref.flatten(), dim=0)
    assert cos > 0.999, cos


@pytest.mark.parametrize("method", ["omniquant", "flexround", "blockap"])
def test_gradients_reach_the_grid_parameters(method):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.1
    learner = METHODS[method](w, AffineGrid(3, 32), MethodConfig(iters=1, lr=1e-2, weight_lr=1e-3))
    x = torch.randn(4, 64)
    loss = (x @ learner.fake_weight().T - x @ w.T).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in learner.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    # finalize reproduces the forward weight exactly
    codes, params = learner.finalize()
    assert torch.equal(learner.grid.dequantize(codes, params), learner.fake_weight().detach())


@pytest.fixture(scope="module")
def two_block_model(tiny_model_factory):
    return tiny_model_factory("llama", num_layers=2, hidden_size=64, intermediate_size=128)


def _run(model, tmp, calib, **kw):
    opts = dict(scheme="w2g32", method="omniquant", calib=str(calib), nsamples=8, seqlen=64, iters=40,
                progress=False)
    opts.update(kw)
    return QuantizedModel.load(quantize(str(model), tmp, QuantizeOptions(**opts)))


def test_final_block_ce_falls(two_block_model, tinystories_text, tmp_path):
    rec = _run(two_block_model, tmp_path / "r", tinystories_text, lr=5e-2)
    final = rec.report["blocks"][-1]
    assert final["loss"] == "ce" and rec.report["blocks"][0]["loss"] == "mse"
    assert final["final"]["kl"] < final["init"]["kl"]
    assert final["final"]["ce"] < final["init"]["ce"]
    assert 0.0 <= final["final"]["top1_agreement"] <= 1.0


@pytest.mark.parametrize("method", ["flexround", "blockap"])
def test_methods_run_and_are_deterministic(two_block_model, tinystories_text, tmp_path, method):
    a = _run(two_block_model, tmp_path / "a", tinystories_text, method=method, iters=10)
    b = _run(two_block_model, tmp_path / "b", tinystories_text, method=method, iters=10)
    for n in a.quantized:
        assert torch.equal(a.quantized[n].codes, b.quantized[n].codes)
        assert all(torch.equal(v, b.quantized[n].params[k]) for k, v in a.quantized[n].params.items())


def test_mse_final_loss_ablation(two_block_model, tinystories_text, tmp_path):
    rec = _run(two_block_model, tmp_path / "m", tinystories_text, final_loss="mse", iters=5)
    assert [b["loss"] for b in rec.report["blocks"]] == ["mse", "mse"]


@pytest.mark.parametrize("fraction", [None, 1.0, 0.25])
def test_token_fraction_recorded_and_ce_still_falls(two_block_model, tinystories_text, tmp_path, fraction):
    """`auto` sends min(1, block weights / head weights) of the tokens through the head; any fraction
    still lowers the final block's KL."""
    from lfq_export.blockwise import auto_token_fraction

    rec = _run(two_block_model, tmp_path / "r", tinystories_text, lr=5e-2, ce_token_fraction=fraction)
    final = rec.report["blocks"][-1]
    block = sum(q.codes.numel() for n, q in rec.quantized.items() if n.startswith("model.layers.1."))
    head = rec.fp.get("lm_head.weight", rec.fp["model.embed_tokens.weight"]).numel()
    expected = auto_token_fraction(block, head) if fraction is None else fraction
    assert final["ce_token_fraction"] == pytest.approx(expected, abs=1e-4)
    assert final["final"]["kl"] < final["init"]["kl"]


@pytest.mark.parametrize("method", ["omniquant", "flexround", "blockap"])
def test_ce_final_block_lr_default_and_override(method):
    """With the soft CE the final block gets the method's scaled lr; --final-lr and --final-loss mse keep theirs."""
    from lfq_export.quantize import FINAL_CE_LR_SCALE, METHOD_DEFAULTS

    lr = METHOD_DEFAULTS[method][1]
    ce = QuantizeOptions(method=method).block_settings()
    assert ce.block_cfg.lr == lr and ce.final_cfg.lr == pytest.approx(lr * FINAL_CE_LR_SCALE[method])
    assert QuantizeOptions(method=method, lr=0.5).block_settings().final_cfg.lr == pytest.approx(
        0.5 * FINAL_CE_LR_SCALE[method])
    assert QuantizeOptions(method=method, final_loss="mse").block_settings().final_cfg.lr == lr
    assert QuantizeOptions(method=method, final_lr=7e-4).block_settings().final_cfg.lr == 7e-4


def test_final_block_lr_is_reported(two_block_model, tinystories_text, tmp_path):
    rec = _run(two_block_model, tmp_path / "r", tinystories_text, method="flexround", iters=3)
    blocks = rec.report["blocks"]
    assert blocks[-1]["lr"] == pytest.approx(0.3 * blocks[0]["lr"])


@pytest.mark.parametrize("tied", [False, True])
def test_logit_head_reproduces_the_models_logits(tiny_model_factory, tied):
    """The LFQ head (final norm + LM head, or the tied embedding) gives the FP model's own logits."""
    from lfq_export.blockwise import BlockRunner, BlockSettings
    from lfq_export.model_io import resolve_model

    src = resolve_model(tiny_model_factory("llama", num_layers=2, tie_word_embeddings=tied))
    model = src.load_model()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        h = model.model.layers[-1](out.hidden_states[-2],
                                   position_embeddings=model.model.rotary_emb(out.hidden_states[-2],
                                                                              torch.arange(16)[None]))
        h = h[0] if isinstance(h, tuple) else h
        head = BlockRunner(src, BlockSettings(), progress=False)._logit_head(src.skeleton())
        torch.testing.assert_close(head(h), out.logits, rtol=1e-5, atol=1e-5)


def test_run_records_the_compute_dtype_it_used(two_block_model, tinystories_text, tmp_path):
    """`--compute-dtype auto` (the default) is resolved before the run and the report names the result."""
    from lfq_export.quantize import resolve_compute_dtype

    rec = _run(two_block_model, tmp_path / "d", tinystories_text, iters=2)
    assert rec.report["settings"]["compute_dtype"] == resolve_compute_dtype("auto", "cpu") != "auto"


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cached_teacher", [False, True])
def test_fused_vocab_kernel_matches_the_eager_loss(monkeypatch, grad_dtype, cached_teacher):
    """The C kernel over the vocabulary (`ce_kernel`) against the eager reference path: loss, gradient
    and statistics, with padding, a chunk that splits the tokens unevenly and logits wide enough that
    every thread gets columns."""
    import lfq_export.lfq_loss as L
    from lfq_export.ce_kernel import ce_kernel_available

    assert ce_kernel_available(torch.zeros(2, 2)), "the vocabulary kernel did not compile (CI has a C compiler)"
    head = _head(d=32, v=3001, seed=1)
    head.weight.mul_(4)  # peaked distributions: large logits, exp underflow in the tail
    w = torch.randn(32, 32)
    x, hf = torch.randn(3, 50, 32), torch.randn(3, 50, 32)
    mask = torch.ones(3, 50)
    mask[1, 40:] = 0
    tl = L.teacher_log_probs(head, hf) if cached_teacher else None
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(L, "ce_kernel_available", lambda *t: False)
        wq = w.clone().requires_grad_(True)
        loss, stats = chunked_soft_ce_backward(head, x @ wq, hf, mask, chunk_tokens=70, teacher_logp=tl,
                                               grad_dtype=grad_dtype)
        results.append((loss, stats.means(), wq.grad))
    (lf, sf, gf), (le, se, ge) = results
    assert abs(float(lf) - float(le)) < 1e-5 * abs(float(le)), (lf, le)
    assert abs(sf["kl"] - se["kl"]) < 1e-4 * se["kl"] and sf["top1_agreement"] == se["top1_agreement"]
    tol = 1e-5 if grad_dtype == torch.float32 else 1e-2  # bf16: the same rounding of a slightly different value
    assert float((gf - ge).norm() / ge.norm()) < tol


def test_fused_vocab_kernel_switch_off():
    """LFQ_EXPORT_FUSED_CE=0 keeps the eager path."""
    import os
    import subprocess
    import sys

    code = "import torch; from lfq_export.ce_kernel import ce_kernel_available as a; assert not a(torch.zeros(2, 2))"
    env = {**os.environ, "LFQ_EXPORT_FUSED_CE": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_omniquant_bank_trains_exactly_like_separate_learners():
    """Linked OmniQuant learners (one clipping computation per grid and group count) give the same values,
    gradients and AdamW trajectory, bit for bit, as each learner computing its own parameters."""
    from lfq_export.methods.learners import OmniQuantLWC

    torch.manual_seed(0)
    grid = AffineGrid(3, 32)
    shapes = [(48, 64), (16, 64), (16, 64), (64, 128)]  # three share (grid, groups), one does not
    weights = [torch.randn(*s) for s in shapes]
    x = [torch.randn(5, s[1]) for s in shapes]
    cfg = MethodConfig(iters=4, lr=5e-2)

    def train(linked: bool):
        learners = [OmniQuantLWC(w, grid, cfg) for w in weights]
        if linked:
            OmniQuantLWC.link(learners)
        groups = [g for lrn in learners for g in lrn.param_groups(cfg)]
        opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=True)
        trace = []
        for _ in range(cfg.iters):
            loss = sum((xi @ lrn.fake_weight().t()).square().mean() for xi, lrn in zip(x, learners))
            loss.backward()
            trace.append([lrn.gamma_logit.grad.clone() for lrn in learners])
            opt.step()
            torch.autograd.graph.increment_version([p for g in groups for p in g["params"]])  # as the engine
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            trace.append([lrn.fake_weight() for lrn in learners])
        return learners, trace

    separate, t_sep = train(False)
    linked, t_link = train(True)
    assert linked[0].__dict__.get("_bank") is linked[1].__dict__.get("_bank") is not None
    assert linked[3].__dict__.get("_bank") is None  # alone in its group
    for a, b in zip(t_sep, t_link):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for a, b in zip(separate, linked):
        assert torch.equal(a.finalize()[0], b.finalize()[0])
