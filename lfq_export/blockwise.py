"""Block-wise PTQ with the LFQ final block.

For block k (in order): the student input is the quantized trajectory (outputs of the already
quantized blocks), the target is the FP block k on the FP trajectory. Blocks 0..L−2 minimise the
block-output MSE; the last block minimises the soft cross-entropy between the FP model's token
distribution and the quantized model's through the frozen final norm and LM head (`lfq_loss`),
unless `final_loss="mse"` (the base method, for ablation).

Only one block's weights are materialised at a time (streamed from the checkpoint), and the
calibration activations at one block boundary are kept: the FP and the quantized trajectory, each
updated in place. A finished block is written to the run directory at once, so an interrupted run
restarts at the first unfinished block; per-block seeds make the resumed codes identical.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .activations import ActivationStore
from .errors import OptimisationError
from .grids import Grid
from .lfq_loss import CEStats, LogitHead, TeacherCache, chunked_soft_ce_backward
from .methods import LinearQuantizer, MethodConfig, get_method
from .model_io import ModelSource
from .record import QuantizedTensor

log = logging.getLogger(__name__)

__all__ = ["BlockSettings", "BlockResult", "BlockRunner", "QuantLinear"]


@dataclass(frozen=True)
class BlockSettings:
    """Settings of the block-wise engine.

    Attributes:
        method: rtn, omniquant, flexround or blockap.
        final_loss: `ce` (LFQ) or `mse` for the last block.
        block_cfg / final_cfg: optimisation schedule of blocks 0..L−2 and of the last block.
        seed: base seed; block k uses `seed · 1_000_003 + k`.
        ce_chunk_tokens: tokens per logit chunk in the LFQ loss (None: `auto_chunk_tokens`).
        compute_dtype: autocast dtype of every block forward — optimisation steps, propagation of the
            calibration activations, evaluation (bf16 matmuls are 2–3× faster on AVX-512-BF16 CPUs and
            are what auto-round uses there; on CPUs without bf16 matmuls they are emulated, 7× slower, and
            `QuantizeOptions(compute_dtype="auto")` picks fp32; the exported weights are exact either way).
        teacher_cache_gb: cache the FP model's log-probabilities of every calibration token (fp16) for
            the LFQ block when they fit in this many GB (and in half the free memory): one logit matmul
            fewer per step. 0 disables it.
        ce_token_fraction: each step, the LFQ loss uses this random fraction of the batch's tokens
            (an unbiased estimate of the token-mean gradient at a fraction of the head's cost). 1.0 = all;
            None = `auto_token_fraction`: the head then costs a little less than the block.
    """

    method: str = "rtn"
    final_loss: str = "ce"
    block_cfg: MethodConfig = field(default_factory=lambda: MethodConfig(iters=0, lr=0.0))
    final_cfg: MethodConfig = field(default_factory=lambda: MethodConfig(iters=0, lr=0.0))
    seed: int = 0
    ce_chunk_tokens: int | None = None
    compute_dtype: torch.dtype = torch.float32
    teacher_cache_gb: float = 4.0
    ce_token_fraction: float | None = 1.0


def auto_chunk_tokens(vocab: int) -> int:
    """Tokens per LFQ logit chunk: the largest power of two in [32, 1024] whose fp32 `[tokens, vocab]`
    logits stay under 24 MB. glibc serves blocks above 32 MB with a fresh mapping on every allocation,
    and faulting its pages in made a 512-token chunk of SmolLM2's 49k vocabulary 3-5x slower than four
    128-token ones (the final block's evaluation: 3.0 s → 0.6 s)."""
    tokens = 1024
    while tokens > 32 and tokens * vocab * 4 > 24 << 20:
        tokens //= 2
    return tokens


def auto_token_fraction(block_weights: int, head_weights: int) -> float:
    """Fraction of tokens whose head matmuls (teacher and student logits, gradient: 3 per token) cost
    `_HEAD_SHARE` of the FLOPs of the block's forward and backward (3 matmuls per token): with the
    softmax passes over `[vocab, tokens]` and the head's wider GEMMs (less efficient on CPUs), one LFQ
    step then costs at most about two MSE steps. At equal FLOPs (share 1) it cost 2.0-2.3 MSE blocks on
    an AVX-512-BF16 Xeon and an AVX2 EPYC. SmolLM2-135M (head 8× a block): 9.4 % of the tokens; held-out
    KL at the head 0.058 with every token, 0.060 with 12.5 %, 0.068 with 6.25 % (`tools/profile_final_block.py`)."""
    return min(1.0, _HEAD_SHARE * block_weights / max(head_weights, 1))


#: the head's share of the LFQ step's matmul FLOPs relative to the block's (see `auto_token_fraction`)
_HEAD_SHARE = 0.75


@dataclass
class BlockResult:
    """What one block produced: its quantized tensors and the report entry."""

    quantized: dict[str, QuantizedTensor]
    fp: dict[str, torch.Tensor]
    report: dict[str, Any]


class QuantLinear(nn.Module):
    """A linear whose weight is its learner's exact fake-quantized weight."""

    def __init__(self, linear: nn.Linear, learner: LinearQuantizer):
        super().__init__()
        self.learner = learner
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.learner.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _layer_kwargs(source: ModelSource, skeleton: nn.Module, embed: nn.Module, seqlen: int) -> list[dict[str, Any]]:
    """The keyword arguments the model passes to each decoder layer for a `[1, seqlen]` input
    (rotary cos/sin, causal mask, position ids), captured by running the model shell with the
    layers replaced by recorders. They broadcast over the batch dimension."""
    inner = skeleton.get_submodule(source.adapter.blocks.rsplit(".", 1)[0])
    captured: list[dict[str, Any]] = []

    class _Recorder(nn.Module):
        def __init__(self, real: nn.Module):
            super().__init__()
            self.attention_type = getattr(real, "attention_type", "full_attention")

        def forward(self, hidden_states, **kwargs):
            captured.append(kwargs)
            return hidden_states

    layers, norm, emb, rot = inner.layers, inner.norm, inner.embed_tokens, inner.rotary_emb
    inner.layers = nn.ModuleList(_Recorder(layer) for layer in layers)
    inner.norm = nn.Identity()
    inner.embed_tokens = embed
    inner.rotary_emb = type(rot)(config=source.config)
    try:
        with torch.no_grad():
            inner(input_ids=torch.zeros(1, seqlen, dtype=torch.long), use_cache=False)
    finally:
        inner.layers, inner.norm, inner.embed_tokens, inner.rotary_emb = layers, norm, emb, rot
    for kw in captured:
        kw["use_cache"] = False
        kw["past_key_values"] = None
    return captured


class BlockRunner:
    """Runs block-wise PTQ over a model source for one quantization plan.

    Usage: `runner.run(calib_ids, grids_by_block, done_blocks, on_block_done)`."""

    def __init__(self, source: ModelSource, settings: BlockSettings, act_dtype: torch.dtype = torch.float32,
                 offload_dir=None, device: str = "cpu", progress: bool = True):
        self.source = source
        self.s = settings
        self.act_dtype = act_dtype
        self.offload_dir = offload_dir
        self.device = torch.device(device)
        self.progress = progress
        self.adapter = source.adapter

    # ---- modules -----------------------------------------------------------------------------
    def _embedding(self, skeleton: nn.Module) -> nn.Module:
        emb = self.adapter.get_embedding(skeleton)
        return self.source.load_module(emb, self.adapter.embedding + ".")

    def _logit_head(self, skeleton: nn.Module) -> LogitHead:
        norm = self.source.load_module(self.adapter.get_final_norm(skeleton), self.adapter.final_norm + ".")
        head_w = self.source.tensor(f"{self.adapter.lm_head}.weight").float()
        bias_name = f"{self.adapter.lm_head}.bias"
        head_b = self.source.tensor(bias_name) if bias_name in self.source.weight_map else None
        return LogitHead(norm, head_w, head_b).to(self.device)

    def _fp_block(self, skeleton: nn.Module, k: int) -> nn.Module:
        block = self.adapter.get_blocks(skeleton)[k]
        return self.source.load_module(block, self.adapter.block_prefix(k)).to(self.device).eval()

    # ---- the run -----------------------------------------------------------------------------
    def run(
        self,
        calib_ids: torch.Tensor | None,
        grids: dict[int, dict[str, Grid]],
        done: dict[int, dict[str, QuantizedTensor]],
        on_block_done: Callable[[int, BlockResult], None],
        stop_after: int | None = None,
    ) -> None:
        """Quantize every block in order (or blocks 0..`stop_after`). `grids[k]` maps full module names to
        grids; `done[k]` holds the tensors of blocks already finished by an earlier (interrupted) run."""
        skeleton = self.source.skeleton()
        n = self.source.n_layers if stop_after is None else min(stop_after + 1, self.source.n_layers)
        needs_data = self.s.method != "rtn" and calib_ids is not None
        if not needs_data:
            for k in tqdm(range(n), desc="RTN", unit="block", disable=not self.progress):
                if k in done:
                    continue
                block = self._fp_block(skeleton, k)
                on_block_done(k, self._quantize_rtn(block, k, grids.get(k, {})))
                self.adapter.get_blocks(skeleton)[k] = block.to("meta")
            return
        self._run_with_data(skeleton, calib_ids, grids, done, on_block_done, n)

    def _quantize_rtn(self, block: nn.Module, k: int, grids: dict[str, Grid]) -> BlockResult:
        t0 = time.perf_counter()
        prefix = self.adapter.block_prefix(k)
        learners = {name: get_method("rtn")(block.get_submodule(name[len(prefix):]).weight, g, self.s.block_cfg)
                    for name, g in grids.items()}
        quantized = self._finalize(block, prefix, learners)
        return BlockResult(quantized, self._fp_tensors(block, prefix, quantized),
                           {"index": k, "method": "rtn", "seconds": time.perf_counter() - t0})

    def _run_with_data(self, skeleton, calib_ids, grids, done, on_block_done, n: int) -> None:
        keep_freed_memory()
        ns, seqlen = calib_ids.shape
        hidden = int(self.source.config.hidden_size)
        embed = self._embedding(skeleton)
        layer_kwargs = _layer_kwargs(self.source, skeleton, embed, seqlen)
        layer_kwargs = [_to_device(kw, self.device) for kw in layer_kwargs]
        fp = ActivationStore((ns, seqlen, hidden), self.act_dtype, self.offload_dir)
        qt = ActivationStore((ns, seqlen, hidden), self.act_dtype, self.offload_dir)
        with torch.no_grad():
            for i in range(ns):
                e = embed(calib_ids[i : i + 1])
                fp.set(slice(i, i + 1), e)
                qt.set(slice(i, i + 1), e)
        del embed
        head = None
        try:
            for k in tqdm(range(n), desc=self.s.method, unit="block", disable=not self.progress):
                kw = layer_kwargs[k]
                block = self._fp_block(skeleton, k)
                self._propagate(block, kw, fp)  # fp now holds the FP target of block k
                prefix = self.adapter.block_prefix(k)
                last = k == self.source.n_layers - 1
                if k in done:  # finished by an earlier run: reuse its exact weights
                    _apply_exact(block, prefix, done[k])
                    if not last:
                        self._propagate(block, kw, qt)
                else:
                    if last and self.s.final_loss == "ce":
                        head = self._logit_head(skeleton)
                    # qt becomes the block's output in there (nothing needs the last block's)
                    on_block_done(k, self._optimise_block(block, k, grids.get(k, {}), kw, qt, fp, head,
                                                          propagate=not last))
                self.adapter.get_blocks(skeleton)[k] = block.to("meta")
        finally:
            fp.close()
            qt.close()

    def _propagate(self, block: nn.Module, kw: dict[str, Any], store: ActivationStore) -> None:
        """Replace `store` by `block(store)` in place, a few samples at a time (samples are independent)."""
        step = _forward_batch(store)
        with torch.no_grad(), self._autocast():
            for i in range(0, len(store), step):
                sl = slice(i, min(i + step, len(store)))
                store.set(sl, block(store.get(sl).to(self.device), **kw).float().cpu())

    def _chunk_tokens(self, head: LogitHead) -> int:
        return self.s.ce_chunk_tokens or auto_chunk_tokens(head.weight.shape[0])

    def _logit_dtype(self) -> torch.dtype:
        """Matmul dtype of the LFQ head's logits (teacher, student, evaluation): bf16 with bf16 compute."""
        return torch.bfloat16 if self.s.compute_dtype == torch.bfloat16 else torch.float32

    def _autocast(self):
        """Block forwards in the compute dtype (matmuls in bf16, norms and softmax in fp32)."""
        dt = self.s.compute_dtype
        return torch.autocast(self.device.type, dtype=dt, enabled=dt != torch.float32)

    # ---- optimisation ------------------------------------------------------------------------
    def _optimise_block(self, block: nn.Module, k: int, grids: dict[str, Grid], kw: dict[str, Any],
                        q_in: ActivationStore, target: ActivationStore, head: LogitHead | None,
                        propagate: bool = False) -> BlockResult:
        """Learn block k's quantization: MSE to the FP output, or (head given) LFQ soft CE. With
        `propagate`, `q_in` is then replaced by the quantized block's output, and the final loss is read
        from it instead of a forward of its own; `seconds` excludes that propagation."""
        t0 = time.perf_counter()
        prefix = self.adapter.block_prefix(k)
        cfg = self.s.final_cfg if k == self.source.n_layers - 1 else self.s.block_cfg
        block.requires_grad_(False)
        method = get_method(self.s.method)
        learners: dict[str, LinearQuantizer] = {}
        originals: dict[str, nn.Module] = {}
        for name, grid in grids.items():
            rel = name[len(prefix):]
            lin = block.get_submodule(rel)
            learners[name] = method(lin.weight, grid, cfg).to(self.device)
            originals[rel] = lin
            _set_submodule(block, rel, QuantLinear(lin, learners[name]))
        method.link(list(learners.values()))
        eval_idx = list(range(min(len(q_in), _EVAL_SAMPLES if head is None else _EVAL_SAMPLES_HEAD)))
        fraction = self.s.ce_token_fraction
        if head is not None and fraction is None:
            fraction = auto_token_fraction(sum(lrn.w_fp.numel() for lrn in learners.values()), head.weight.numel())
        teacher = None
        if head is not None:
            teacher = self._teacher_cache(head, target, len(q_in) if fraction >= 1.0 else len(eval_idx))
        before = self._evaluate(block, kw, q_in, target, head, eval_idx, teacher)
        losses = (self._train(block, k, kw, q_in, target, head, learners, cfg, teacher, fraction)
                  if learners and cfg.iters > 0 else [])
        for rel, lin in originals.items():
            _set_submodule(block, rel, lin)
        quantized = self._finalize(block, prefix, learners)
        seconds = time.perf_counter() - t0
        if propagate:  # not counted in the block's time
            self._propagate(block, kw, q_in)
        t1 = time.perf_counter()
        after = self._evaluate(block, kw, q_in, target, head, eval_idx, teacher, outputs_given=propagate)
        seconds += time.perf_counter() - t1
        report = {
            "index": k,
            "method": self.s.method,
            "loss": "ce" if head is not None else "mse",
            "iters": cfg.iters if learners else 0,
            "lr": cfg.lr,
            "init": before,
            "final": after,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "seconds": round(seconds, 3),
        }
        if head is not None:
            report["ce_token_fraction"] = round(fraction or 1.0, 4)
        return BlockResult(quantized, self._fp_tensors(block, prefix, quantized), report)

    def _teacher_cache(self, head: LogitHead, target: ActivationStore, ns: int) -> TeacherCache:
        """Teacher log-probs of samples 0..ns−1 (all of them when training uses whole samples, only the
        evaluation samples when it samples tokens)."""
        import psutil

        seqlen = target.shape[1]
        budget = min(self.s.teacher_cache_gb * 2**30, psutil.virtual_memory().available / 2)
        cache = TeacherCache(head, lambda idx: target.get(idx).to(self.device), ns, seqlen,
                             self._chunk_tokens(head), budget, logit_dtype=self._logit_dtype())
        if not cache.enabled:
            log.info("LFQ teacher cache would exceed %.1f GB: teacher logits are recomputed every step",
                     budget / 2**30)
        return cache

    def _train(self, block, k, kw, q_in, target, head, learners, cfg: MethodConfig,
               teacher: TeacherCache | None = None, token_fraction: float | None = 1.0) -> list[float]:
        groups = [g for lrn in learners.values() for g in lrn.param_groups(cfg) if g["params"]]
        # fused: one kernel per tensor instead of a dozen passes over FlexRound's S2 and Block-AP's weights
        # (as large as the block's weights)
        opt = torch.optim.AdamW(groups, weight_decay=cfg.wd, fused=True)
        params = [p for g in groups for p in g["params"]]
        # cosine decay to lr/20 (EfficientQAT's schedule; FlexRound and OmniQuant use a similar one)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / max(cfg.iters, 1))))
        gen = torch.Generator().manual_seed(self.s.seed * 1_000_003 + k)
        ns, bs = len(q_in), max(1, min(cfg.batch_size, len(q_in)))
        order: list[int] = []
        losses: list[float] = []
        bar = tqdm(range(cfg.iters), desc=f"block {k}", unit="it", leave=False, disable=not self.progress)
        for it in bar:
            if len(order) < bs:
                order += torch.randperm(ns, generator=gen).tolist()
            idx, order = order[:bs], order[bs:]
            x = q_in.get(idx).to(self.device)
            y_fp = target.get(idx).to(self.device)
            with self._autocast():
                y = block(x, **kw)
            if head is not None:
                yq, yt = y.float().flatten(0, 1), y_fp.flatten(0, 1)
                tl = None
                if token_fraction is not None and token_fraction < 1.0:  # a random subset of the batch's
                    keep = max(1, int(round(token_fraction * yq.shape[0])))  # tokens; their teacher directly
                    sel = torch.randperm(yq.shape[0], generator=gen)[:keep]
                    yq, yt = yq[sel], yt[sel]
                elif teacher is not None:
                    tl = teacher.get(idx)
                    tl = None if tl is None else tl.flatten(0, 1)
                loss, _ = chunked_soft_ce_backward(
                    head, yq, yt, chunk_tokens=self._chunk_tokens(head), stats=False,
                    teacher_logp=None if tl is None else tl.to(self.device), grad_dtype=self._logit_dtype(),
                    logit_dtype=self._logit_dtype())
            else:
                loss = F.mse_loss(y.float(), y_fp)
                loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value) or _has_bad_grad(learners):
                raise OptimisationError(
                    f"block {k}: the loss became {value} at iteration {it} (lower --lr or --final-lr)")
            opt.step()
            torch.autograd.graph.increment_version(params)  # fused AdamW updates in place without bumping them
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(value)
            if it % 10 == 0 or it == cfg.iters - 1:
                bar.set_postfix(loss=f"{value:.4g}")
        return losses

    @torch.no_grad()
    def _evaluate(self, block, kw, q_in, target, head, idx: list[int], teacher=None,
                  outputs_given: bool = False) -> dict[str, float]:
        """Block MSE on `idx` samples, plus CE/KL/top-1 agreement through the head if given.
        `outputs_given`: `q_in` already holds the block's outputs."""
        sq, n, stats = 0.0, 0, CEStats()
        step = _forward_batch(q_in)
        for a in range(0, len(idx), step):
            sl = idx[a : a + step]
            if outputs_given:
                y = q_in.get(sl).to(self.device)
            else:
                with self._autocast():
                    y = block(q_in.get(sl).to(self.device), **kw).float()
            t = target.get(sl).to(self.device)
            sq += float(F.mse_loss(y, t, reduction="sum"))
            n += t.numel()
            if head is not None:
                tl = None if teacher is None else teacher.get(sl)
                tl = None if tl is None else tl.to(self.device)
                stats.add(chunked_soft_ce_backward(head, y, t, chunk_tokens=self._chunk_tokens(head), backward=False,
                                                   teacher_logp=tl, logit_dtype=self._logit_dtype())[1])
        out = {"mse": sq / max(n, 1)}
        if head is not None:
            out.update(stats.means())
        return out

    def _finalize(self, block: nn.Module, prefix: str, learners: dict[str, LinearQuantizer]) -> dict[str, QuantizedTensor]:
        """Exact codes/params from each learner; the block's weights become the exact grid weights."""
        out = {}
        for name, learner in learners.items():
            codes, params = learner.finalize()
            codes, params = codes.cpu(), {k: v.cpu() for k, v in params.items()}
            lin = block.get_submodule(name[len(prefix):])
            qt = QuantizedTensor(name, learner.grid, codes, params, str(lin.weight.dtype).replace("torch.", ""))
            with torch.no_grad():
                lin.weight.copy_(qt.dequantize())  # (copies across devices)
            out[name] = qt
        return out

    def _fp_tensors(self, block: nn.Module, prefix: str, quantized: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
        """The block's unquantized tensors (norms, biases, linears kept in FP), original dtype."""
        qnames = {f"{n}.weight" for n in quantized}
        return {n: self.source.tensor(n) for n in self.source.names_with_prefix(prefix) if n not in qnames}


#: calibration samples on which each block's loss is reported before and after optimisation
_EVAL_SAMPLES = 8
#: the same for the LFQ block, whose evaluation (full-vocabulary logits, KL, agreement: ~0.15 s a
#: sample for SmolLM2, twice) would otherwise be a tenth of the block's cost
_EVAL_SAMPLES_HEAD = 1


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the kernel: block-wise training frees
    and re-allocates the same few-MB tensors every step, and re-faulting those pages cost ~5 % of the
    run. Peak memory is unchanged (what is kept is what the run already used)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest; bigger blocks are still mapped per call
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def _forward_batch(store: ActivationStore) -> int:
    """Samples per no-grad forward: about 4M activation elements (bounded memory, fewer calls)."""
    _, seqlen, hidden = store.shape
    return max(1, min(16, (1 << 22) // (seqlen * hidden)))


def _set_submodule(root: nn.Module, rel: str, module: nn.Module) -> None:
    parent, _, child = rel.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _has_bad_grad(learners: dict[str, LinearQuantizer]) -> bool:
    """True if a gradient holds a NaN or an infinity. One reading pass per tensor (its sum, which is not
    finite if any element is, or if the sum itself overflows: a diverging step either way), instead of
    `isfinite().all()`'s three weight-sized passes: 8 ms of a FlexRound step on a 2-core AVX2 CPU."""
    sums = [p.grad.sum() for lrn in learners.values() for p in lrn.parameters() if p.grad is not None]
    return bool(sums) and not bool(torch.isfinite(torch.stack(sums)).all())


def _to_device(kw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(mv(x) for x in v)
        return v

    return {k: mv(v) for k, v in kw.items()}


def _apply_exact(block: nn.Module, prefix: str, tensors: dict[str, QuantizedTensor]) -> None:
    with torch.no_grad():
        for name, qt in tensors.items():
            block.get_submodule(name[len(prefix):]).weight.copy_(qt.dequantize())
