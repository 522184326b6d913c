"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) through DTensor `parallelize_module`.

Inside each block, q, k, v and the MLP's first layer(s) are split by columns (each rank
computes its own heads and its share of the hidden units, no communication), and the
attention output projection and the MLP's last layer by rows (each rank's partial product is
summed across ranks): one collective per sub-layer forward, one backward. The token embedding
is split by vocabulary rows and the head by vocabulary columns (the same split, so a tied head
stays tied); the head's logits are gathered whole, so the loss is the plain cross-entropy.

Sequence parallelism (Korthikanti et al. 2022) also splits the residual stream, norms and
dropout along the sequence between the sub-layers: the all-reduce after a row-split layer
becomes a reduce-scatter, and an all-gather brings the whole sequence back before the next
column-split layer, so the activations there cost 1/tp each for the same traffic.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT, tied_weights


def apply_tp(model: GPT, mesh: DeviceMesh, sequence_parallel: bool) -> GPT:
    """Split a plain model (or a pipeline stage of one) in place over a 1-D mesh."""
    tp, cfg = mesh.size(), model.config
    if cfg.vocab_size % tp:
        raise ScratchError(f"the vocabulary ({cfg.vocab_size}) is not divisible by parallel.tp "
                           f"({tp}); pad it with --train.pad_vocab_multiple={tp * 64}")
    # Layout of the residual stream between sub-layers: split along the sequence, or whole.
    stream = Shard(1) if sequence_parallel else Replicate()
    plan: dict = {}
    if model.tok_emb is not None:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        if model.pos_emb is not None:  # its output is (T, C): the sequence is dimension 0
            plan["pos_emb"] = RowwiseParallel(
                input_layouts=Replicate(),
                output_layouts=Shard(0) if sequence_parallel else Replicate())
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
        if sequence_parallel:
            plan["norm_f"] = SequenceParallel()
    mlp_in = ["mlp.gate", "mlp.up"] if cfg.mlp == "swiglu" else ["mlp.fc"]
    for name, block in model.blocks.items():
        for proj in ["attn.q_proj", "attn.k_proj", "attn.v_proj", *mlp_in]:
            plan[f"blocks.{name}.{proj}"] = ColwiseParallel()
        for proj in ["attn.proj", "mlp.proj"]:
            plan[f"blocks.{name}.{proj}"] = RowwiseParallel(output_layouts=stream)
        # attn(x, rope, cache, layer, mask) and mlp(x): the whole sequence in.
        plan[f"blocks.{name}.attn"] = PrepareModuleInput(
            input_layouts=(stream, None, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None, None))
        plan[f"blocks.{name}.mlp"] = PrepareModuleInput(
            input_layouts=(stream,), desired_input_layouts=(Replicate(),))
        if sequence_parallel:
            plan[f"blocks.{name}.norm1"] = SequenceParallel()
            plan[f"blocks.{name}.norm2"] = SequenceParallel()
        # Each rank now computes n_head / tp query heads and n_kv_head / tp kv heads.
        block.attn.n_head //= tp
        block.attn.n_kv_head //= tp
    parallelize_module(model, mesh, plan)
    if not sequence_parallel:
        # Norms run whole on every rank; their weights become replicated DTensors too, so that
        # every parameter is a DTensor (the optimizer's fused loops take no mix of the two).
        norms = [b.norm1 for b in model.blocks.values()] + [b.norm2 for b in model.blocks.values()]
        for norm in norms + ([model.norm_f] if model.norm_f is not None else []):
            distribute_module(norm, mesh, input_fn=_replicated_in, output_fn=_local_out)
    if tied_weights(model) and model.tok_emb is not None and model.lm_head is not None:
        # Both were split by vocabulary rows in the same way; make them one parameter again.
        model.lm_head.weight = model.tok_emb.weight
    return model


def _replicated_in(module, inputs, mesh: DeviceMesh):
    return tuple(DTensor.from_local(t, mesh, [Replicate()]) for t in inputs)


def _local_out(module, output, mesh: DeviceMesh):
    return output.to_local()


def settle_gradients(model: GPT) -> None:
    """Bring every gradient to its parameter's layout, once per step before clipping and the
    optimizer. DTensor's backward leaves some in another: the norms' as partial sums (under
    sequence parallelism each rank saw its part of the sequence), the position table's whole.
    Summing partial gradients once per step, not per micro-batch, is also the cheaper order."""
    for p in model.parameters():
        g = p.grad
        if g is not None and isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)
