"""AdamW as torch's fused kernel, without ``torch.optim``: same arithmetic, state and ``state_dict``.

Two reasons not to build ``torch.optim.AdamW``:

- its constructor imports ``torch._dynamo`` (``Optimizer.add_param_group`` is wrapped in
  ``torch._disable_dynamo``), which costs 1-3 s at the start of every process;
- on a GPU, the fused kernel gives each block of work 65,536 values of one tensor (``multi_tensor_apply``),
  so the default MLP's 512,000-weight first layer runs in 8 blocks on a GPU of 132 multiprocessors: the
  largest kernel of a training step (27 µs of about 230 a minibatch on an H200). Handing the kernel slices of
  ``SLICE`` values of the same tensors (views: the same memory, the same values per element) spreads it over
  many blocks: about 14 µs a minibatch with slices of 8,192 values, and a step of 51.7 ms instead of 54.3 ms
  with slices of 32,768 (``benchmarks/gpu_profile.py``).

The update is ``torch._fused_adamw_``, the kernel that ``torch.optim.AdamW(fused=True)`` calls, with the
same arguments, so weights and state are bit for bit torch's (tested). ``state_dict`` has torch's layout,
so checkpoints load into either.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

SLICE = 32768  # values of one tensor per block of the GPU kernel

_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def fused_adamw_available(device: torch.device) -> bool:
    """Whether torch has the fused AdamW kernel for ``device`` (CUDA from torch 2.1, CPU from 2.4)."""
    if not hasattr(torch, "_fused_adamw_"):
        return False
    return device.type == "cuda" or (device.type == "cpu" and _TORCH >= (2, 4))


class FusedAdamW:
    """AdamW over ``params`` (one group) with torch's fused kernel; the optimizer interface the engine uses.

    ``slice_size`` overrides how many values of a tensor the kernel takes per slice (default ``SLICE`` on a
    GPU; on a CPU the kernel splits its work itself, so tensors go whole).

    ``step()`` has no host synchronisation and keeps its tensors in place, so it can be captured in a CUDA
    graph (the step counts live on the parameters' device, as with ``capturable=True``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        slice_size: int | None = None,
    ) -> None:
        params = list(params)
        self.slice_size = slice_size  # None: SLICE on a GPU, whole tensors on a CPU
        self.param_groups = [
            {
                "params": params, "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                "amsgrad": False, "maximize": False, "foreach": None, "capturable": bool(params) and params[0].is_cuda,
                "differentiable": False, "fused": True, "decoupled_weight_decay": True,
            }
        ]  # fmt: skip
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        self._lists: tuple | None = None  # the kernel's tensor lists, built once the state exists

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if set_to_none:
            for p in self.params:
                p.grad = None
        elif grads:
            torch._foreach_zero_(grads)

    def _init_state(self) -> None:
        for p in self.params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._lists = None

    def _tensor_lists(self, with_grad: list[torch.Tensor]):
        """Parameters, gradients and moments for the kernel: on a GPU, large tensors as slices of ``SLICE``."""
        key = tuple((id(p), p.data_ptr(), p.grad.data_ptr()) for p in with_grad)
        if self._lists is not None and self._lists[0] == key:
            return self._lists[1]
        out: tuple[list, list, list, list, list] = ([], [], [], [], [])
        for p in with_grad:
            st = self.state[p]
            tensors = (p.detach(), p.grad, st["exp_avg"], st["exp_avg_sq"])
            n = p.numel()
            size = self.slice_size or (SLICE if p.is_cuda else n)
            if n > size and all(t.is_contiguous() for t in tensors):
                flat = [t.view(-1) for t in tensors]
                for lo in range(0, n, size):
                    for lst, t in zip(out, flat, strict=False):
                        lst.append(t[lo : lo + size])
                    out[4].append(st["step"])
            else:
                for lst, t in zip(out, tensors, strict=False):
                    lst.append(t)
                out[4].append(st["step"])
        if all(p.is_cuda for p in with_grad):  # graphs reuse the same tensors; eager steps get new gradients
            self._lists = (key, out)
        return out

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return
        if any(not self.state[p] for p in with_grad):
            self._init_state()
        g = self.param_groups[0]
        torch._foreach_add_([self.state[p]["step"] for p in with_grad], 1)
        params, grads, exp_avgs, exp_avg_sqs, steps = self._tensor_lists(with_grad)
        beta1, beta2 = g["betas"]
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=g["lr"], beta1=beta1, beta2=beta2,
            weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False, maximize=False, grad_scale=None,
            found_inf=None,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The layout of torch's: state keyed by parameter index, the group's options with its parameters' indices."""
        index = {id(p): i for i, p in enumerate(self.params)}
        state = {index[id(p)]: dict(st) for p, st in self.state.items() if st}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of this class or of ``torch.optim.AdamW`` over the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("the optimizer state does not match the model's parameters")
        g = self.param_groups[0]
        for k in ("lr", "betas", "eps", "weight_decay"):
            if k in groups[0]:
                g[k] = tuple(groups[0][k]) if k == "betas" else groups[0][k]
        position = {pid: i for i, pid in enumerate(groups[0]["params"])}
        self.state = defaultdict(dict)
        for pid, st in state_dict["state"].items():
            p = self.params[position[pid]]
            self.state[p] = {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).detach().clone().to(p.device),
                "exp_avg": st["exp_avg"].detach().to(p.device, p.dtype).clone(),
                "exp_avg_sq": st["exp_avg_sq"].detach().to(p.device, p.dtype).clone(),
            }
        self._lists = None
