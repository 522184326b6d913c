"""What the alignment stages share besides data: the reference model, dropout, and figures
gathered over a step's micro-batches and data-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT, set_dropout


def disable_dropout(model: nn.Module) -> None:
    """Dropout off (TRL's `disable_dropout`): the log-probs of a sequence must be the same
    each time it is scored, or the policy/reference ratios of DPO and PPO are noise."""
    set_dropout(model, 0.0)


def md_cell(text: str, width: int = 160) -> str:
    """Text as one cell of a Markdown table: pipes escaped, line breaks shown as " / "."""
    return text.replace("|", "\\|").replace("\n", " / ")[:width]


def same_tokenizer(a, b) -> bool:
    return a.to_dict() == b.to_dict()


def load_reference(path: str | None, policy: GPT, tokenizer, section: str) -> GPT:
    """The frozen reference model: a copy of the policy as it starts, or the model at
    `path`, which must share the policy's tokenizer (log-probs of the same token ids)."""
    import copy

    if path is None:
        ref = copy.deepcopy(policy)
    else:
        from scratchlm.model.load import load_pretrained

        ref, ref_tok, _ = load_pretrained(path)
        if not same_tokenizer(ref_tok, tokenizer):
            raise ScratchError(f"{section}.ref_model {path} has another tokenizer than the "
                               "policy; the reference must score the policy's own token ids "
                               "(start both from the same SFT model)")
    disable_dropout(ref)
    return ref.eval().requires_grad_(False)


class StepMeter:
    """Figures of one optimizer step, gathered as (sum, count) over its micro-batches;
    `means()` sums them over data-parallel ranks and starts again."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.device = torch.device("cpu")  # NCCL reduces device tensors only

    def add(self, name: str, total: float | torch.Tensor, count: float | torch.Tensor
            ) -> None:
        if isinstance(total, torch.Tensor):
            self.device = total.device
        row = self.totals.setdefault(name, [0.0, 0.0])
        row[0] += float(total)
        row[1] += float(count)

    def means(self, group=None) -> dict[str, float]:
        if not self.totals:
            return {}
        names = sorted(self.totals)
        sums = torch.tensor([self.totals[n] for n in names], dtype=torch.float64,
                            device=self.device)
        if dist.is_initialized():
            dist.all_reduce(sums, group=group)
        self.totals = {}
        return {n: s / c for n, (s, c) in zip(names, sums.tolist()) if c > 0}
