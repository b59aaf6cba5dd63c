"""CUDA-graph training epochs: one captured replay per epoch instead of ~70 kernel launches per minibatch.

On a GPU the small MLP's minibatch step is bound by launch overhead, not arithmetic. The step (gather,
forward, loss, backward, fused AdamW, dynamics update, loss accumulation) runs on static tensors sized for
``buffer_size + chunk_size`` cells (plus one padding row); each training step copies its merged set into
them. A whole epoch of minibatches is captured as one graph, for each number of minibatches met (a stream
has few: the first chunk, the full buffer plus a chunk, the last chunk, the final buffer), so the host
launches one graph per epoch and never waits on the reader threads for the GIL between minibatches.

Epoch orders are padded with the padding row to whole minibatches; padding is masked out of loss and
dynamics, so a padded minibatch learns exactly what the shorter one would.

Under DDP (NCCL) the gradients live in one flat buffer that the graph all-reduces after every minibatch
(NCCL collectives can be captured; DDP's own hooks cannot be replayed). Every rank replays the same
number of minibatches: ranks pad to the minibatches of the rank holding the most cells, so a rank with
fewer cells contributes a zero gradient to its last minibatches and still steps its optimizer with the
average, which keeps every rank's weights identical.

Without CUDA (``capture=False``, used by tests on CPU) the same epochs run eagerly on the same tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._distributed import rank_world
from ._dynamics import Dynamics
from ._objective import Objective, replay_loss, replay_sum
from ._train import host_orders, to_device


class GraphedTrainer:
    """Minibatch epochs through a captured CUDA graph; same interface and loss as :func:`train_epochs`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        *,
        capacity: int,
        n_features: int,
        objective: Objective,
        batch_size: int,
        distill: float,
        compile: bool = False,
        capture: bool | None = None,
        max_graphs: int = 8,
    ) -> None:
        dev = next(model.parameters()).device
        self.model, self.optimizer, self.dev = model, optimizer, dev
        self.objective, self.batch_size, self.distill = objective, batch_size, distill
        self.capture = dev.type == "cuda" if capture is None else capture
        self.world = rank_world()[1]
        n_logits = objective.n_logits
        rows = capacity + 1  # the last row pads epochs to whole minibatches
        self.pad_row = capacity
        self.X = torch.zeros((rows, n_features), device=dev)
        self.y = torch.zeros((rows, objective.n_tasks), dtype=torch.int64, device=dev)
        self.stored = torch.zeros((rows, n_logits), device=dev)
        self.buf_weight = torch.zeros(rows, device=dev)
        self.valid = torch.zeros(rows, device=dev)
        self.w = torch.ones(n_logits, device=dev)
        B = batch_size
        self.order = torch.full((-(-rows // B) * B,), self.pad_row, dtype=torch.int64, device=dev)
        self.loss_acc = torch.zeros((), device=dev)
        self.dyn = Dynamics(rows, dev, n_logits, objective.offsets)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # minibatches per epoch -> its graph
        self.max_graphs = max_graphs
        self._pool = None
        self.flat_grad = None
        self.comm_dtype = torch.float32
        if self.world > 1:  # the parameters' gradients as views of one buffer, all-reduced in one call
            self.flat_grad = torch.zeros(sum(p.numel() for p in model.parameters()), device=dev)
            self._bind_grads()
        # torch.compile fuses the elementwise work of forward, loss and dynamics into few kernels
        self._forward = torch.compile(self._forward_loss, dynamic=False) if compile else self._forward_loss
        # the lean step (one process, the built-in loss, not compiled): fewer kernels a minibatch
        self.lean = self.flat_grad is None and objective.user_loss is None and not compile
        if self.lean:
            self._init_lean(rows, n_logits)

    def _init_lean(self, rows: int, n_logits: int) -> None:
        """Static tensors of the lean step.

        Per cell: labels with padding as ``ignore_index`` (``y_ce``), the loss weight of each task's label
        (``wrow``), and, with replay, the stored logits and the buffer flag in one row (``aux``: one gather a
        minibatch). Per minibatch of an epoch: the loss denominators (``denom``, computed once an epoch), the
        number of cells and the loss.
        """
        dev, T = self.dev, self.objective.n_tasks
        steps = len(self.order) // self.batch_size
        self.y_ce = torch.full((rows, T), -100, dtype=torch.int64, device=dev)
        self.wrow = torch.zeros((rows, T), device=dev)
        self.aux = torch.zeros((rows, n_logits + 1), device=dev) if self.distill > 0 else None
        self.denom = torch.ones((steps, T + 1), device=dev)
        self.mb_count = torch.zeros(steps, device=dev)
        self.mb_loss = torch.zeros(steps, device=dev)
        self.task_offsets = torch.as_tensor(self.objective.offsets[:-1], dtype=torch.int64, device=dev)

    def _bind_grads(self) -> None:
        """Under DDP, make every gradient a view of ``flat_grad`` again.

        A ``zero_grad(set_to_none=True)`` by anyone else would otherwise leave the eager fallback
        all-reducing a stale buffer.
        """
        if self.flat_grad is None:
            return
        pos = 0
        for p in self.model.parameters():
            view = self.flat_grad[pos : pos + p.numel()].view_as(p)
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view
            pos += p.numel()

    def _forward_loss(self, idx: torch.Tensor):
        xb, yb = self.X[idx], self.y[idx]
        logits = self.model(xb)
        loss = self.objective(logits, yb, self.w, self.valid[idx])
        if self.distill > 0:
            loss = loss + self.distill * replay_loss(logits, self.stored[idx], self.buf_weight[idx])
        return loss, logits

    def _fill_lean(self, n: int) -> None:
        """The lean step's per-cell tensors for the merged set in the first ``n`` rows (after ``train`` filled them)."""
        self.y_ce[:n].copy_(self.y[:n])
        self.wrow.copy_(self.w[self.y + self.task_offsets] * self.valid[:, None])
        if self.aux is not None:
            C = self.objective.n_logits
            self.aux[:, :C].copy_(self.stored * self.buf_weight[:, None])
            self.aux[:, C].copy_(self.buf_weight * self.valid)

    def _lean_epoch_start(self, n_steps: int) -> None:
        """Every minibatch's loss denominators and cell count, for the epoch's order (a few kernels an epoch)."""
        B, T = self.batch_size, self.objective.n_tasks
        order = self.order[: n_steps * B]
        wsum = self.wrow.index_select(0, order).view(n_steps, B, T).sum(1)
        self.denom[:n_steps, :T].copy_(wsum.clamp_min(1e-12))
        self.mb_count[:n_steps].copy_(self.valid.index_select(0, order).view(n_steps, B).sum(1))
        if self.aux is not None:
            buffer_cells = self.aux[:, -1].index_select(0, order).view(n_steps, B).sum(1)
            # the loss adds distill * replay_sum / denominator: keep denominator / distill
            self.denom[:n_steps, T].copy_((buffer_cells * self.objective.n_logits).clamp_min(1.0) / self.distill)

    def _lean_step(self, idx: torch.Tensor, k: int) -> None:
        """Minibatch ``k`` of the epoch: the loss of :meth:`_forward_loss` in fewer kernels.

        The weighted cross-entropy is one ``nll_loss`` per task (padding rows are its ``ignore_index``) over
        denominators computed once an epoch; replay is one gather and a fused multiply-add; gradients are
        handed to the optimizer as backward allocates them (no accumulation into zeroed buffers); the loss is
        stored per minibatch and weighted by cell counts once an epoch.
        """
        xb, yb = self.X.index_select(0, idx), self.y_ce.index_select(0, idx)
        logits = self.model(xb)
        loss = None
        for t, part in enumerate(self.objective.summed_task_losses(logits, yb, self.w)):
            part = part / self.denom[k, t]
            loss = part if loss is None else loss + part
        if self.aux is not None:
            a = self.aux.index_select(0, idx)
            C = self.objective.n_logits
            loss = loss + replay_sum(logits, a[:, :C], a[:, C:]) / self.denom[k, -1]
        # backward allocates the gradients afresh (inside a graph: from its private pool, so after a replay
        # p.grad points there; nothing reads it between steps) and the optimizer consumes them
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.dyn.record(idx, logits)
        self.mb_loss[k].copy_(loss.detach())

    def _step(self, idx: torch.Tensor) -> None:
        loss, logits = self._forward(idx)
        loss.backward()
        if self.flat_grad is not None:  # DDP's gradient average
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
        self.loss_acc += loss.detach() * self.valid[idx].sum()

    def _epoch(self, n_steps: int) -> None:
        """``n_steps`` minibatches, in the order held by ``self.order`` (what a graph captures)."""
        B = self.batch_size
        if self.lean:
            self._lean_epoch_start(n_steps)
            for k in range(n_steps):
                self._lean_step(self.order[k * B : (k + 1) * B], k)
            self.loss_acc.copy_(torch.dot(self.mb_loss[:n_steps], self.mb_count[:n_steps]))
            return
        for k in range(n_steps):
            self._step(self.order[k * B : (k + 1) * B])

    def _run_epoch(self, n_steps: int) -> None:
        if not self.capture:
            self._epoch(n_steps)
            return
        graph = self.graphs.get(n_steps)
        if graph is None and len(self.graphs) < self.max_graphs:
            graph = self.graphs[n_steps] = self._capture(n_steps)
        if graph is None:  # an unusual stream with many chunk sizes: the rest run eagerly (same arithmetic)
            self._epoch(n_steps)
        else:
            graph.replay()

    def _capture(self, n_steps: int) -> torch.cuda.CUDAGraph:
        """A graph of ``n_steps`` minibatches; capturing runs nothing.

        The first capture warms up on a side stream first (cuBLAS, the optimizer's state, compilation) and
        then puts weights, optimizer state and the order back as they were.
        """
        if not self.graphs:
            self._warm_up()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the chunk reader's threads may allocate (pinned memory) while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._epoch(n_steps)
        self._pool = graph.pool()  # the graphs share one memory pool (they never run at the same time)
        return graph

    def _warm_up(self) -> None:
        params = list(self.model.parameters())
        saved_params = [p.detach().clone() for p in params]
        had_state = len(self.optimizer.state) > 0
        saved_state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items()} for p in params}
        saved_loss, saved_order = self.loss_acc.clone(), self.order.clone()
        self.optimizer.zero_grad(set_to_none=False)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self.order[: self.batch_size] = torch.arange(self.batch_size, device=self.dev) % self.pad_row
                for _ in range(3):
                    self._epoch(1)
        finally:  # also after a failure (out of memory): the model is as it was before the warm-up
            torch.cuda.current_stream().wait_stream(side)
            self._restore(params, saved_params, had_state, saved_state, saved_loss, saved_order)

    def _restore(self, params, saved_params, had_state, saved_state, saved_loss, saved_order) -> None:
        with torch.no_grad():
            for p, s in zip(params, saved_params, strict=True):
                p.copy_(s)
                if p.grad is not None:
                    p.grad.zero_()
            for p in params:
                for k, v in self.optimizer.state[p].items():
                    if had_state:
                        v.copy_(saved_state[id(p)][k])
                    else:
                        v.zero_()  # a fresh AdamW: zero moments, step 0
            self.loss_acc.copy_(saved_loss)
            self.order.copy_(saved_order)

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
        while_training=None,
    ) -> tuple[Dynamics, list[float]]:
        """Epochs on the merged set ``X`` with host ``targets`` ``(n, n_tasks)``, as :func:`train_epochs`.

        Under DDP ``n_max`` is the largest ``n`` of all ranks: every rank replays as many minibatches as it needs.
        ``while_training`` is called once every epoch has been launched, before waiting for them.
        """
        n = int(targets.shape[0])
        if max(n, n_max or 0) > self.pad_row:  # the last row is the padding row: never a cell
            raise ValueError(f"{max(n, n_max or 0)} cells do not fit the trainer's capacity of {self.pad_row}.")
        self._bind_grads()
        self.X[:n].copy_(X)
        self.y[:n].copy_(to_device(torch.from_numpy(np.ascontiguousarray(targets)), self.dev))
        self.stored[:n].copy_(stored_logits)
        self.buf_weight[:n].copy_(is_buffer.to(self.dev, torch.float32))
        self.valid.zero_()
        self.valid[:n] = 1.0
        if weights is None:
            weights = self.objective.weights(self.objective.task_counts(targets))
        self.w.copy_(to_device(torch.from_numpy(np.asarray(weights)).float(), self.dev))
        if self.lean:
            self._fill_lean(n)
        B = self.batch_size
        # whole minibatches; under DDP as many as the rank with the most cells needs
        n_steps = -(-max(n, 0 if n_max is None else n_max) // B)
        orders = host_orders(n, epochs, generator)
        orders = torch.cat([orders, torch.full((epochs, n_steps * B - n), self.pad_row, dtype=orders.dtype)], 1)
        orders = to_device(orders, self.dev)
        self.dyn.reset()
        self.model.train()
        losses = torch.zeros(epochs, device=self.dev)
        for e in range(epochs):
            self.loss_acc.zero_()
            self.order[: n_steps * B].copy_(orders[e])
            if n_steps:  # every rank empty (all cells skipped): nothing to replay
                self._run_epoch(n_steps)
            self.dyn.end_epoch(self.y[:n])
            losses[e] = self.loss_acc
        if while_training is not None:
            while_training()
        return self.dyn.head(n), (losses / max(n, 1)).tolist()
