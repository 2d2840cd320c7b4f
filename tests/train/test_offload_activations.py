"""Activation offloading (shardtune/train/offload.py): the hooks' pack/unpack path, exercised on CPU through a fake
mover, gives bit-identical gradients (with and without gradient checkpointing, peft's and our fused LoRA); parameters
and small tensors stay; the trainer on CPU ignores the option with one line."""

from __future__ import annotations

import pytest
import torch

from shardtune.config import load_config
from shardtune.model.load import build_model
from shardtune.train.loss import fused_loss_sum, logits_loss_sum
from shardtune.train.offload import (ActivationOffloader, CudaMover, LayerOffload, OffloadActivations, OffloadStats,
                                     PinnedPool, activation_offloader, pool_bucket)
from support import run_overrides


class CloneMover:
    """Stands in for the CUDA mover on CPU: 'host' and 'device' copies are clones. `corrupt` garbles what comes back
    (to show backward really reads the copies); `slow` never reports a copy done (the in-flight cap must wait)."""

    def __init__(self, corrupt: bool = False, slow: bool = False):
        self.corrupt, self.slow = corrupt, slow
        self.to_host_bytes: list[int] = []
        self.waits = 0

    def accepts(self, t):
        return t.device.type == "cpu"

    def to_host(self, raw):
        self.to_host_bytes.append(raw.numel())
        return raw.clone(), object()

    def to_device(self, host):
        back = host.clone()
        if self.corrupt:
            back.add_(1)
        return back, object()

    def done(self, event):
        return not self.slow

    def wait(self, event):
        self.waits += 1


class PoolMover(CloneMover):
    """CloneMover whose host copies come from a PinnedPool over plain CPU memory, as the CUDA mover's do."""

    def __init__(self):
        super().__init__()
        self.pool = PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8))
        self.released: list[int] = []

    def to_host(self, raw):
        self.to_host_bytes.append(raw.numel())
        host = self.pool.get(raw.numel())
        host.copy_(raw)
        return host, object()

    def release(self, host):
        self.released.append(host.data_ptr())
        self.pool.put(host)


def _lora_model(tiny_model, ckpt: bool, fused: bool, policy: str = "layer"):
    cfg = load_config(None, ["train.method=lora", f"train.gradient_checkpointing={ckpt}", "lora.dropout=0.1",
                             f"train.checkpoint_policy={policy}"])
    model = build_model(cfg, tiny_model("llama"), torch.device("cpu"), torch.float32)
    if fused:
        from shardtune.model.lora_fused import fuse_lora
        assert fuse_lora(model) > 0
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)  # a non-trivial adapter, so every LoRA gradient is non-zero
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _grads(model, batch, loss_fn, ctx=None):
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout draws in every run
    if ctx is None:
        loss = loss_fn(model, batch)
    else:
        with ctx:
            loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


LOSSES = {"logits": lambda m, b: logits_loss_sum(m, b, torch.float32, torch.device("cpu")),
          # chunks of the vocabulary projection run under their own non-reentrant checkpoint
          "fused": lambda m, b: fused_loss_sum(m, b, torch.float32, torch.device("cpu"), chunk_tokens=16,
                                               use_liger=False)}


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("fused_lora", [False, True], ids=["peft-lora", "fused-lora"])
@pytest.mark.parametrize("loss", ["logits", "fused"])
def test_gradients_bit_identical(tiny_model, ckpt, fused_lora, loss):
    model, batch = _lora_model(tiny_model, ckpt, fused_lora), _batch()
    ref_loss, ref = _grads(model, batch, LOSSES[loss])
    mover = CloneMover()
    hooks = OffloadActivations(mover, min_bytes=0)
    off_loss, got = _grads(model, batch, LOSSES[loss], hooks)
    s = hooks.stats
    assert s.moved_storages > 0 and s.fetched_bytes + _still_on_device(hooks) == s.moved_bytes
    assert torch.equal(off_loss, ref_loss)
    assert ref and all(ref[n].abs().sum() > 0 for n in ref if "lora_A" in n)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    # nothing is left on the device side after backward
    assert all(r.device_raw is None for r in hooks._records)
    if not ckpt:
        # the same input is saved by the q/k/v projections (and by peft's lora_A), and matmuls keep 2-D views of
        # 3-D inputs: each storage goes to the host once
        assert s.moved_saves > s.moved_storages
        assert s.prefetched_bytes > 0


def _still_on_device(hooks) -> int:
    """Bytes whose copy to the host was still in flight when backward began: backward reads the original there."""
    return sum(r.nbytes for r in hooks._records if r.seq == len(hooks._records) - 1)


def test_checkpointing_moves_only_the_layer_inputs(tiny_model):
    """Inside a non-reentrant checkpoint region the checkpoint's own hooks win: far fewer storages move."""
    batch, counts = _batch(), {}
    for ckpt in (False, True):
        hooks = OffloadActivations(CloneMover(), min_bytes=0)
        _grads(_lora_model(tiny_model, ckpt, False), batch, LOSSES["logits"], hooks)
        counts[ckpt] = hooks.stats.moved_storages
    assert 0 < counts[True] < counts[False] / 4, counts


def test_selective_checkpointing_moves_only_the_layer_inputs(tiny_model):
    """Selective checkpointing keeps its matmul outputs in the checkpoint's own cache, out of the hooks' reach: the
    same storages move as with whole-layer checkpointing (the planner's offload_stays_bytes_per_token), and the
    gradients are those of the run without offloading."""
    batch, moved = _batch(), {}
    for policy in ("layer", "selective"):
        model = _lora_model(tiny_model, True, False, policy)
        _, ref = _grads(model, batch, LOSSES["logits"])
        hooks = OffloadActivations(CloneMover(), min_bytes=0)
        _, got = _grads(model, batch, LOSSES["logits"], hooks)
        assert all(torch.equal(got[n], ref[n]) for n in ref), policy
        moved[policy] = (hooks.stats.moved_storages, hooks.stats.moved_bytes)
    assert moved["selective"] == moved["layer"], moved


def _blocks(model):
    from shardtune.model.load import checkpointed_blocks
    return checkpointed_blocks(model.get_base_model())


@pytest.mark.parametrize("ckpt_layers", [None, 1], ids=["no-ckpt", "one-layer-recomputed"])
def test_offload_layers_moves_only_the_chosen_layers(tiny_model, ckpt_layers):
    """train.offload_layers: only inside the first n layers that do not recompute; gradients bit-identical; nothing
    moves in backward (the module hooks are gone once the forward's context closes, so a recompute never offloads)."""
    from shardtune.model.load import enable_checkpointing
    batch = _batch()
    model = _lora_model(tiny_model, False, True)
    if ckpt_layers:
        enable_checkpointing(model, ckpt_layers)
    blocks = _blocks(model)
    _, ref = _grads(model, batch, LOSSES["logits"])
    whole = OffloadActivations(CloneMover(), min_bytes=0)
    _grads(model, batch, LOSSES["logits"], whole)
    mover = CloneMover()
    off = ActivationOffloader(mover, min_bytes=0)
    assert isinstance(off(), OffloadActivations)  # unlimited: the whole forward
    assert off.limit_to(blocks, 1).startswith("offload: saved activations of 1 decoder layers")
    chosen = off.layers
    assert len(chosen) == 1 and not getattr(chosen[0], "gradient_checkpointing", False)
    assert chosen[0] not in off.watch and all(not getattr(b, "gradient_checkpointing", False) for b in off.watch)
    ctx = off()
    assert isinstance(ctx, LayerOffload)
    model.zero_grad()
    torch.manual_seed(7)
    with ctx:
        loss = LOSSES["logits"](model, batch)
    forward_moves = len(mover.to_host_bytes)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert 0 < off.stats.moved_storages < whole.stats.moved_storages
    assert len(mover.to_host_bytes) == forward_moves  # nothing offloaded during backward / recompute
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)
    # the later layer's backward started the copies back before the offloaded layer was reached: every byte came
    # back ahead of use; without the watched layers the first one is fetched when backward asks for it
    later = blocks.index(chosen[-1]) < len(blocks) - 1
    assert later == (ckpt_layers is None)  # with the one recomputed layer first, nothing follows the chosen one
    if later:
        assert off.stats.fetched_bytes == off.stats.prefetched_bytes > 0
    blind = ActivationOffloader(CloneMover(), layers=chosen, min_bytes=0)
    _grads(model, batch, LOSSES["logits"], blind())
    assert 0 <= blind.stats.prefetched_bytes < blind.stats.fetched_bytes


def test_backward_reads_the_copies(tiny_model):
    """A mover that garbles the copies back changes the gradients: the unpack path is the one backward uses."""
    model, batch = _lora_model(tiny_model, False, True), _batch()
    _, ref = _grads(model, batch, LOSSES["logits"])
    # min_bytes keeps the integer targets (640 bytes) out of it: garbled class indices would raise instead
    _, got = _grads(model, batch, LOSSES["logits"], OffloadActivations(CloneMover(corrupt=True), min_bytes=4096))
    assert any(not torch.equal(got[n], ref[n]) for n in ref)


def test_inflight_cap_waits_for_the_oldest_copy(tiny_model):
    """A copy never reported done: above max_inflight_bytes the compute side waits on the oldest; same gradients."""
    model, batch = _lora_model(tiny_model, False, True), _batch()
    _, ref = _grads(model, batch, LOSSES["logits"])
    mover = CloneMover(slow=True)
    hooks = OffloadActivations(mover, min_bytes=0, max_inflight_bytes=1)
    _, got = _grads(model, batch, LOSSES["logits"], hooks)
    assert mover.waits >= hooks.stats.moved_storages - 1
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def _small_graph(hooks=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)                        # weight 16 KiB
    frozen = torch.nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(128, 64, requires_grad=True)         # 32 KiB
    small = torch.randn(4, 64, requires_grad=True)       # 1 KiB
    big = torch.randn(4096, 64)                          # 1 MiB, of which a 16 KiB slice is saved
    w = torch.randn(64, requires_grad=True)
    with hooks if hooks is not None else torch.enable_grad():
        h = lin(x)                      # saves x (moved) and a view of the weight (a parameter: kept)
        y = frozen(h * h) + h.tanh()    # h saved twice by mul (one copy), tanh's output, a frozen weight's view
        z = lin(small)                  # a small input: kept
        part = big[:64] * w             # a small slice of a large storage: kept
    (y.sum() + z.sum() + part.sum()).backward()
    return [t.grad for t in (x, small, w, lin.weight, lin.bias)]


def test_parameters_and_small_tensors_stay():
    mover = CloneMover()
    hooks = OffloadActivations(mover, min_bytes=8 << 10)
    got, ref = _small_graph(hooks), _small_graph()
    s = hooks.stats
    assert mover.to_host_bytes == [32 << 10] * 3, mover.to_host_bytes  # x, h, tanh(h): nothing else
    assert (s.moved_storages, s.moved_saves) == (3, 4)
    assert s.kept_param_saves == 3           # lin's weight twice, frozen's once
    assert s.kept_small_bytes >= 1 << 10 and s.kept_partial_bytes == 16 << 10
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_pool_buckets_round_up_by_at_most_an_eighth():
    for n in (1, 65536, 65537, 1 << 20, (1 << 20) + 1, 3 * 10**8, 64 << 20):
        b = pool_bucket(n)
        assert n <= b <= max(1 << 16, n * 1.125), (n, b)
    assert pool_bucket(100_000_000) == pool_bucket(100_000_001)  # near sizes share a bucket


def test_pool_reuses_buffers_and_frees_beyond_its_high_water():
    pool = PinnedPool(allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    first = [pool.get(n) for n in (300_000, 1 << 20, 1 << 20)]
    assert first[0].numel() == 300_000 and pool.in_use == pool.high_water
    ptrs = {t.data_ptr() for t in first}
    for t in first:
        pool.put(t)
    allocated = pool.pinned_bytes
    second = [pool.get(n) for n in (1 << 20, 300_001, 1 << 20)]   # the next step: no new pinned memory
    assert pool.pinned_bytes == allocated and {t.data_ptr() for t in second} == ptrs
    for t in second:
        pool.put(t)
    assert pool.free_bytes == pool.high_water
    extra = pool.get(5 << 20)  # a size never seen: pinned anew
    assert pool.pinned_bytes > allocated
    pool.put(extra)
    assert pool.free_bytes <= pool.high_water  # kept only within the most ever in use at once


def test_host_copies_go_back_to_the_pool_after_backward_and_steps_reuse_them(tiny_model):
    """Every host copy is released once, after backward (never during it, when a copy back may still read it), and
    the second step pins no new memory; gradients stay bit-identical."""
    model, batch = _lora_model(tiny_model, False, True), _batch()
    _, ref = _grads(model, batch, LOSSES["logits"])
    mover = PoolMover()
    pinned = []
    for _ in range(2):
        mover.released.clear()
        hooks = OffloadActivations(mover, min_bytes=0)
        _, got = _grads(model, batch, LOSSES["logits"], hooks)
        assert all(torch.equal(got[n], ref[n]) for n in ref)
        assert len(mover.released) == hooks.stats.moved_storages == len(set(mover.released))
        assert all(r.host is None for r in hooks._records)
        pinned.append(mover.pool.pinned_bytes)
    assert pinned[1] == pinned[0] and mover.pool.in_use == 0


def test_cuda_mover_refuses_cpu_tensors():
    """On CPU the real mover copies nothing: every saved tensor stays where it is."""
    hooks = OffloadActivations(CudaMover.__new__(CudaMover), min_bytes=0)
    x = torch.randn(256, 256, requires_grad=True)
    with hooks:
        y = (x * x).sum()
    y.backward()
    assert hooks.stats.moved_bytes == 0 and hooks.stats.kept_other_saves > 0
    assert torch.equal(x.grad, 2 * x.detach())


def test_trainer_on_cpu_ignores_the_option_with_one_line(tiny_model, alpaca_file, tmp_path):
    from shardtune.train.loop import Trainer
    said: list[str] = []
    cfg = load_config(None, run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "out",
                                          **{"train.offload_activations": True, "train.max_steps": 2}))
    tr = Trainer(cfg, out=said.append)
    res = tr.run()
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    lines = [m for m in said if "offload_activations" in m]
    assert lines == ["train.offload_activations: needs CUDA; ignored on cpu"], said
    assert tr.offload.mover is None and tr.offload.stats == OffloadStats()


def test_offloader_builds_no_context_on_cpu():
    said: list[str] = []
    off = activation_offloader(False, torch.device("cpu"), said.append)
    assert said == [] and off.mover is None
    with off():
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_cuda_gradients_bit_identical(tiny_model, ckpt):
    dev = torch.device("cuda")
    model, batch = _lora_model(tiny_model, ckpt, True).to(dev), {k: v.to(dev) for k, v in _batch().items()}
    loss_fn = lambda m, b: fused_loss_sum(m, b, torch.bfloat16, dev, chunk_tokens=16, use_liger=False)  # noqa: E731
    _, ref = _grads(model, batch, loss_fn)
    hooks = OffloadActivations(CudaMover(dev), min_bytes=0, prefetch_bytes=1 << 16, max_inflight_bytes=1 << 16)
    _, got = _grads(model, batch, loss_fn, hooks)
    torch.cuda.synchronize()
    assert hooks.stats.moved_bytes > 0 and hooks.stats.fetched_bytes > 0
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_trainer_offloads_only_the_first_layers_it_is_told(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """train.offload_layers in the trainer, with the CPU stand-in mover: it names the layers in one line, the hooks
    move storages only inside them (fewer than the whole forward) and the run trains."""
    import shardtune.train.loop as loop
    from shardtune.train.loop import Trainer
    monkeypatch.setattr(loop, "activation_offloader",
                        lambda enabled, device, say: ActivationOffloader(CloneMover() if enabled else None, min_bytes=0))
    runs = {}
    for layers in (None, 1):
        said: list[str] = []
        extra = {"train.offload_activations": True, "train.max_steps": 2}
        if layers is not None:
            extra["train.offload_layers"] = layers
        cfg = load_config(None, run_overrides(tiny_model("llama"), alpaca_file, tmp_path / f"out{layers}", **extra))
        tr = Trainer(cfg, out=said.append)
        res = tr.run()
        assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
        runs[layers] = (tr.offload.stats.moved_storages, said)
    assert "offload: saved activations of 1 decoder layers go to pinned CPU memory" in runs[1][1]
    assert 0 < runs[1][0] < runs[None][0] / 2
