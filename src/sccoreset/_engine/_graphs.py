"""CUDA-graph training steps: one captured replay per minibatch instead of ~70 kernel launches from Python.

On a GPU the small MLP's minibatch step is bound by launch overhead, not arithmetic. The step (gather,
forward, loss, backward, fused AdamW, dynamics update, loss accumulation) is captured once per run on
static tensors sized for ``buffer_size + chunk_size`` cells; each step copies its merged set into them
and replays the graph per full minibatch (the last, partial one runs eagerly on the same tensors).

Under DDP (NCCL) the gradients live in one flat buffer that the graph all-reduces (NCCL collectives can
be captured): DDP's own hooks cannot be replayed. Every rank must replay the graph the same number of
times, so ranks pad their epoch orders with a padding row (masked out of loss and dynamics) to the
minibatches of the rank holding the most cells; a rank with fewer cells then contributes a zero
gradient to its last minibatch, as DDP's ``Join`` does in the eager step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._distributed import rank_world
from ._dynamics import Dynamics
from ._objective import Objective, replay_loss
from ._train import host_orders, to_device


class GraphedTrainer:
    """Minibatch epochs through a captured CUDA graph; same interface and loss as :func:`train_epochs`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        capacity: int,
        n_features: int,
        objective: Objective,
        batch_size: int,
        distill: float,
        compile: bool = False,
    ) -> None:
        dev = next(model.parameters()).device
        self.model, self.optimizer, self.dev = model, optimizer, dev
        self.objective, self.batch_size, self.distill = objective, batch_size, distill
        self.world = rank_world()[1]
        n_logits = objective.n_logits
        rows = capacity + 1 if self.world > 1 else capacity  # under DDP one more: the padding row
        self.pad_row = capacity
        self.X = torch.zeros((rows, n_features), device=dev)
        self.y = torch.zeros((rows, objective.n_tasks), dtype=torch.int64, device=dev)
        self.stored = torch.zeros((rows, n_logits), device=dev)
        self.buf_weight = torch.zeros(rows, device=dev)
        self.valid = torch.zeros(rows, device=dev) if self.world > 1 else None
        self.w = torch.ones(n_logits, device=dev)
        self.idx = torch.arange(batch_size, device=dev)
        self.loss_acc = torch.zeros((), device=dev)
        self.dyn = Dynamics(rows, dev, n_logits, objective.offsets)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.flat_grad = None
        self.comm_dtype = torch.float32
        if self.world > 1:  # the parameters' gradients as views of one buffer, all-reduced in one call
            params = list(model.parameters())
            self.flat_grad = torch.zeros(sum(p.numel() for p in params), device=dev)
            pos = 0
            for p in params:
                p.grad = self.flat_grad[pos : pos + p.numel()].view_as(p)
                pos += p.numel()
        # torch.compile fuses the elementwise work of forward, loss and dynamics into few kernels
        self._forward = torch.compile(self._forward_loss, dynamic=False) if compile else self._forward_loss

    def _forward_loss(self, idx: torch.Tensor):
        xb, yb = self.X[idx], self.y[idx]
        logits = self.model(xb)
        loss = self.objective(logits, yb, self.w, None if self.valid is None else self.valid[idx])
        if self.distill > 0:
            loss = loss + self.distill * replay_loss(logits, self.stored[idx], self.buf_weight[idx])
        return loss, logits

    def _step(self, idx: torch.Tensor, *, full: bool = True) -> None:
        loss, logits = self._forward(idx) if full else self._forward_loss(idx)
        loss.backward()
        if self.flat_grad is not None:  # DDP's gradient average, captured in the graph
            if self.comm_dtype == self.flat_grad.dtype:
                torch.distributed.all_reduce(self.flat_grad)
            else:  # compressed, as DDP's bf16_compress_hook: half the bytes on the wire
                low = self.flat_grad.to(self.comm_dtype)
                torch.distributed.all_reduce(low)
                self.flat_grad.copy_(low)
            self.flat_grad.div_(self.world)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.dyn.record(idx, logits)
        n_real = idx.numel() if self.valid is None else self.valid[idx].sum()
        self.loss_acc += loss.detach() * n_real

    def _capture(self) -> None:
        """Warm up on a side stream, capture, then put weights and optimizer state back as they were."""
        params = list(self.model.parameters())
        saved_params = [p.detach().clone() for p in params]
        had_state = len(self.optimizer.state) > 0
        saved_state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items()} for p in params}
        self.optimizer.zero_grad(set_to_none=False)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(self.idx)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the chunk reader's threads may allocate (pinned memory) while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step(self.idx)
        with torch.no_grad():
            for p, s in zip(params, saved_params, strict=True):
                p.copy_(s)
                p.grad.zero_()
            for p in params:
                for k, v in self.optimizer.state[p].items():
                    if had_state:
                        v.copy_(saved_state[id(p)][k])
                    else:
                        v.zero_()  # a fresh AdamW: zero moments, step 0

    def train(
        self,
        X: torch.Tensor,
        targets: np.ndarray,
        *,
        epochs: int,
        generator: torch.Generator,
        stored_logits: torch.Tensor,
        is_buffer: torch.Tensor,
        weights: np.ndarray | None = None,
        n_max: int | None = None,
    ) -> tuple[Dynamics, list[float]]:
        """Epochs on the merged set ``X`` with host ``targets`` ``(n, n_tasks)``, as :func:`train_epochs`.

        Under DDP ``n_max`` is the largest ``n`` of all ranks: every rank replays as many minibatches as it needs.
        """
        n = int(targets.shape[0])
        self.X[:n].copy_(X)
        self.y[:n].copy_(to_device(torch.from_numpy(np.ascontiguousarray(targets)), self.dev))
        self.stored[:n].copy_(stored_logits)
        self.buf_weight[:n].copy_(is_buffer.to(self.dev, torch.float32))
        if weights is None:
            weights = self.objective.weights(self.objective.task_counts(targets))
        self.w.copy_(to_device(torch.from_numpy(np.asarray(weights)).float(), self.dev))
        B = self.batch_size
        orders = host_orders(n, epochs, generator)
        n_steps = None
        if self.valid is not None:  # pad to the same number of full minibatches on every rank
            n_steps = -(-max(n if n_max is None else n_max, n) // B)
            pad = torch.full((epochs, n_steps * B - n), self.pad_row, dtype=orders.dtype)
            orders = torch.cat([orders, pad], 1)
            self.valid.zero_()
            self.valid[:n] = 1.0
        orders = to_device(orders, self.dev)
        if self.graph is None:
            self._capture()
        self.dyn.reset()
        self.model.train()
        losses = torch.zeros(epochs, device=self.dev)
        for e in range(epochs):
            self.loss_acc.zero_()
            if n_steps is not None:
                for k in range(n_steps):
                    self.idx.copy_(orders[e, k * B : (k + 1) * B])
                    self.graph.replay()
            else:
                for lo in range(0, n, B):
                    if lo + B <= n:
                        self.idx.copy_(orders[e, lo : lo + B])
                        self.graph.replay()
                    else:
                        self._step(orders[e, lo:n], full=False)
            self.dyn.end_epoch(self.y[:n])
            losses[e] = self.loss_acc
        return self.dyn.head(n), (losses / max(n, 1)).tolist()
