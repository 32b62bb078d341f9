"""SAM, ASAM and Friendly-SAM as wrappers around any torch optimizer.

One SAM-family step, in the terms of ``docs/algorithm.md``::

    loss(w).backward()          # clean pass: p.grad = g
    opt.first_step()            # d from g (F-SAM: g - sigma * EMA), w <- w + rho * d / ||d||
    loss(w + e).backward()      # perturbed pass: p.grad = g'
    opt.second_step()           # w restored by copy, base optimizer steps with g'

Implementation notes (each measured by ``scripts/bench_optim.py``):

* Parameters are bucketed by (param group, device, dtype) and every update is one ``torch._foreach_*`` call per
  bucket, so the number of dispatched ops does not grow with the number of parameter tensors.
* The gradient norm stays a device tensor; the step never synchronises with the host.
* The only per-parameter buffers are the saved weights (SAM) and the saved weights plus the EMA (F-SAM),
  allocated on first use and reused. The direction and the perturbation are computed in place in ``p.grad``,
  which the perturbed pass overwrites anyway. ``first_step`` therefore consumes the clean gradients.
* Weights are restored with ``copy_`` into the same storage (never ``p.data = ...``), so static addresses
  survive for CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from fsam.errors import CheckpointError
from fsam.names import METHOD_REGISTRY, PERTURBATIONS

_EPS = 1e-12
_STATE_VERSION = 1


def _readable_without_sync(*tensors: torch.Tensor) -> bool:
    """True when every tensor is in host memory, so reading a value from one waits for no device."""
    return all(t.device.type == "cpu" for t in tensors)


def _check_range(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around a base optimizer; ASAM with ``adaptive=True``.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. ``None`` when ``base_optimizer``
            is an already-built optimizer instance.
        base_optimizer: a torch optimizer class (built here with ``params`` and ``**base_kwargs``) or an
            optimizer instance. It owns the learning rate, momentum and weight decay; attach LR schedulers to
            ``self.base_optimizer`` (the wrapper shares its ``param_groups``, so either works).
        rho: perturbation radius, >= 0 (SAM: 0.05-0.2 on CIFAR; ASAM wants 0.5-2.0). None is the method's own
            (:data:`fsam.names.METHOD_REGISTRY`: SAM 0.1, ASAM 1.0; F-SAM 0.2, F-ASAM 1.0), as in the configs.
        adaptive: ASAM: scale the perturbation elementwise by ``T = |w| + eta``.
        eta: the ASAM offset added to ``|w|``, >= 0.
        perturbation: what the ascent follows (the paper's Figure-1 analysis). ``"minibatch"``: the minibatch
            gradient g (SAM). ``"full"``: the full-batch gradient f alone. ``"noise"``: the part of g orthogonal to
            f, ``g - (g·f / ||f||²) f``. Both analysis directions are then normalised and scaled by ``rho`` like g,
            and need f, given by :meth:`set_full_gradient` (see :func:`fsam.optim.full_gradient`) before the first
            step and refreshed as often as the caller likes.
        **base_kwargs: passed to ``base_optimizer`` when it is a class (lr, momentum, weight_decay, ...).

    ``rho``, ``adaptive`` and ``eta`` are stored per param group and may differ between groups; the gradient
    norm is always one global L2 norm over all parameters of all groups, and so is the projection of
    ``perturbation="noise"``.
    """

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        rho: float | None = None,
        adaptive: bool = False,
        eta: float = 0.0,
        perturbation: str = "minibatch",
        **base_kwargs: Any,
    ) -> None:
        if rho is None:  # the method's own radius, the same one the configs give it
            rho = METHOD_REGISTRY[self._method_name(adaptive)].rho
        _check_range("rho", rho, rho >= 0, ">= 0 (the perturbation radius)")
        _check_range("eta", eta, eta >= 0, ">= 0 (the ASAM offset added to |w|)")
        if perturbation not in PERTURBATIONS:
            raise ValueError(
                f"perturbation={perturbation!r} is not allowed: perturbation must be one of {', '.join(PERTURBATIONS)}"
            )
        self.perturbation = perturbation
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if params is not None or base_kwargs:
                raise ValueError(
                    "base_optimizer is already built: pass params=None and no base optimizer keyword arguments"
                )
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is an optimizer class")
            self.base_optimizer = base_optimizer(params, **base_kwargs)
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}"
            )
        defaults = dict(self._method_defaults(rho=rho, adaptive=adaptive, eta=eta))
        super().__init__(self.base_optimizer.param_groups, defaults)
        # One list of groups for both: a scheduler or add_param_group on either is seen by the other.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.steps_taken = 0
        self._perturbed: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.last_grad_norm: torch.Tensor | None = None

    @staticmethod
    def _method_name(adaptive: bool) -> str:
        """The registry's name of this class with or without ASAM's scaling."""
        return "asam" if adaptive else "sam"

    def _method_defaults(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    # ----------------------------------------------------------------------------------------------- buckets
    def _buckets(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """Parameters that have a gradient, grouped by (param group, device, dtype)."""
        buckets = []
        for group in self.param_groups:
            by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_key[(p.device, p.dtype)].append(p)
            buckets.extend((group, params) for params in by_key.values())
        return buckets

    def _saved_weights(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        saved = []
        for p in params:
            state = self.state[p]
            if "saved_weights" not in state:
                state["saved_weights"] = torch.empty_like(p, memory_format=torch.preserve_format)
            saved.append(state["saved_weights"])
        return saved

    # ---------------------------------------------------------------------------------------- the direction
    def _make_direction(self, group: dict[str, Any], params: list[torch.Tensor], revertible: bool) -> None:
        """Turn ``p.grad`` (the raw gradient g) into the ascent direction d, in place. SAM: d = g."""

    def _revert_direction_state(self) -> None:
        """Undo what ``_make_direction`` changed in the optimizer state (nothing for SAM)."""

    # ---------------------------------------------------------------------------- the full-batch gradient
    @torch.no_grad()
    def set_full_gradient(self, gradients: Iterable[torch.Tensor | None]) -> None:
        """Keep ``gradients`` (one per parameter, in param-group order; None for a parameter without one) as the
        full-batch gradient f that ``perturbation="full"`` and ``"noise"`` use until the next call.

        Copied into one parameter-sized buffer per parameter (allocated on the first call, reused after), so the
        caller may reuse its tensors.
        """
        params = self._ordered_params()
        gradients = list(gradients)
        if len(gradients) != len(params):
            raise ValueError(
                f"set_full_gradient() got {len(gradients)} gradients for {len(params)} parameters: give one per "
                "parameter, in param-group order"
            )
        for p, gradient in zip(params, gradients):
            if gradient is None:
                self.state[p].pop("full_gradient", None)
                continue
            if gradient.shape != p.shape:
                raise ValueError(
                    f"set_full_gradient() got a gradient of shape {tuple(gradient.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}: give one per parameter, in param-group order"
                )
            buffer = self.state[p].get("full_gradient")
            if buffer is None:
                self.state[p]["full_gradient"] = gradient.detach().to(device=p.device, dtype=p.dtype).clone()
            else:
                buffer.copy_(gradient)

    def _direction_from_full_gradient(self, params: list[torch.Tensor]) -> None:
        """``p.grad`` (g) becomes f (``"full"``) or ``g - (g·f / ||f||²) f`` (``"noise"``), in place."""
        missing = sum("full_gradient" not in self.state[p] for p in params)
        if missing:
            raise RuntimeError(
                f"perturbation={self.perturbation!r} needs the full-batch gradient, and {missing} of {len(params)} "
                "parameters have none: call set_full_gradient() before first_step()"
            )
        grads = [p.grad for p in params]
        full = [self.state[p]["full_gradient"] for p in params]
        if self.perturbation == "full":
            torch._foreach_copy_(grads, full)
            return
        device = grads[0].device
        dot = torch.stack([torch.sum(g * f, dtype=torch.float64).to(device) for g, f in zip(grads, full)]).sum()
        squared_norm = self._global_norm(full).to(device).square()
        # _EPS: a zero full gradient leaves g as it is (nothing to remove) instead of NaN weights.
        coefficient = dot / (squared_norm + _EPS)
        for g, f in zip(grads, full):
            g.sub_(f * coefficient.to(g.device, g.dtype))

    # ----------------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True, *, revertible: bool = False) -> None:
        """Move the weights to ``w + e`` along the (adaptive) normalised direction.

        Reads the clean gradients in ``p.grad`` and overwrites them (with the direction, or on accelerators the
        perturbation itself), so by default they are zeroed afterwards, ready for the perturbed backward pass.

        Args:
            zero_grad: zero the gradients afterwards (set to None).
            revertible: keep what ``revert()`` needs to undo the whole step exactly (F-SAM then keeps a copy
                of its EMA). ``train_step`` sets it under fp16, where a step can turn out non-finite.

        Raises:
            RuntimeError: no parameter has a gradient (nothing is changed or counted).
        """
        if self._perturbed:
            raise RuntimeError("first_step() was called twice without second_step() or revert() in between")
        buckets = self._buckets()
        if not buckets:
            # Checked before anything changes: counting this step would only defer the failure to second_step().
            raise RuntimeError(
                "first_step() found no parameter with a gradient: call loss.backward() before first_step()"
            )
        for group, params in buckets:
            self._make_direction(group, params, revertible)
        if self.perturbation != "minibatch":
            self._direction_from_full_gradient([p for _, params in buckets for p in params])

        # ASAM: T = |w| + eta is built in the saved-weights buffer before it takes its real contents.
        grads_of = {id(params): [p.grad for p in params] for _, params in buckets}
        saved_of = {id(params): self._saved_weights(params) for _, params in buckets}
        for group, params in buckets:
            if group["adaptive"]:
                scale_t = saved_of[id(params)]
                torch._foreach_copy_(scale_t, params)
                torch._foreach_abs_(scale_t)
                if group["eta"]:
                    torch._foreach_add_(scale_t, group["eta"])
                torch._foreach_mul_(grads_of[id(params)], scale_t)

        norm = self._global_norm([g for _, params in buckets for g in grads_of[id(params)]])
        self.last_grad_norm = norm
        # _EPS keeps a zero direction (a dead layer, a zero loss) a zero perturbation: 0 / 0 would be NaN weights.
        inv_norm = (norm + _EPS).reciprocal()

        for group, params in buckets:
            grads, saved = grads_of[id(params)], saved_of[id(params)]
            if group["adaptive"]:
                torch._foreach_mul_(grads, saved)
            torch._foreach_copy_(saved, params)
            if _readable_without_sync(params[0], inv_norm):
                # On the CPU the norm is already a number (reading it waits for nothing), so the scale goes into
                # the add as alpha: w + (rho/|d|)·d in one pass instead of scaling d first (two passes less).
                torch._foreach_add_(params, grads, alpha=float(inv_norm) * group["rho"])
            else:
                scale = inv_norm.to(params[0].device, non_blocking=True) * group["rho"]
                torch._foreach_mul_(grads, scale)  # a device tensor: no host synchronisation
                torch._foreach_add_(params, grads)
            self._perturbed.append((params, saved))
        self.steps_taken += 1
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @staticmethod
    def _global_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
        """One L2 norm over all ``grads`` (float32, or float64 for float64 grads) on the first one's device, without a host sync."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        partial = []
        for same in by_device.values():
            dtype = torch.float64 if any(g.dtype == torch.float64 for g in same) else torch.float32
            partial.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(same, 2, dtype=dtype))))
        if not partial:
            return None
        if len(partial) == 1:
            return partial[0]
        device = partial[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device, non_blocking=True) for n in partial]))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (undo the perturbation) without stepping."""
        for params, saved in self._perturbed:
            torch._foreach_copy_(params, saved)
        self._perturbed = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights exactly and let the base optimizer step with the perturbed gradients."""
        if not self._perturbed:
            raise RuntimeError("second_step() needs a first_step() before it")
        self.restore()
        self.base_optimizer.step()
        # What torch's LR scheduler wrapper around self.step() records; a loop that drives first_step() and
        # second_step() never calls step(), and a scheduler attached to this object would warn that
        # lr_scheduler.step() came before optimizer.step().
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def revert(self) -> None:
        """Undo a step begun with ``first_step(revertible=True)``: weights and method state as before it."""
        self.restore()
        self._revert_direction_state()
        self.steps_taken -= 1

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """A whole step for closure-based loops.

        The clean gradients must already be in ``p.grad`` (call ``loss.backward()`` first); ``closure`` must
        zero nothing and run forward and backward again (at the perturbed weights). Returns its result.
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that runs forward and backward again, because "
                "a SAM-family step evaluates the loss twice. Pass step(closure), or call first_step() and "
                "second_step() around your second backward pass."
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            result = closure()
        self.second_step()
        return result

    # ----------------------------------------------------------------------------------------------- state
    def _ordered_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _method_state(self) -> dict[str, Any]:
        """SAM keeps the full-batch gradient of the analysis directions, so a resumed run perturbs as before."""
        if self.perturbation == "minibatch":
            return {}
        return {"full_gradient": [self.state[p]["full_gradient"].detach().clone() if "full_gradient" in self.state[p]
                                  else None for p in self._ordered_params()]}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        if "full_gradient" not in state:
            return
        params = self._ordered_params()
        if len(state["full_gradient"]) != len(params):
            raise CheckpointError(
                f"the SAM state holds a full-batch gradient for {len(state['full_gradient'])} parameter tensors, "
                f"this model has {len(params)}: the checkpoint is from a different model"
            )
        try:
            self.set_full_gradient(state["full_gradient"])
        except ValueError as exc:
            raise CheckpointError(f"the saved full-batch gradient does not fit this model: {exc}") from exc

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything a resumed run needs: the base optimizer's state, the method's state and step count.

        The saved weights are scratch space between ``first_step`` and ``second_step`` and are not saved:
        save checkpoints between steps.
        """
        if self._perturbed:
            raise RuntimeError("state_dict() in the middle of a step (the weights are perturbed): save between steps")
        return {
            "version": _STATE_VERSION,
            "method": type(self).__name__,
            "base": self.base_optimizer.state_dict(),
            "steps_taken": self.steps_taken,
            "method_state": self._method_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or "base" not in state_dict or "method" not in state_dict:
            raise CheckpointError(
                f"this optimizer state was not saved by a {type(self).__name__} optimizer "
                "(it has no 'base'/'method' entries): was it saved with the same optimizer setting?"
            )
        if state_dict["method"] != type(self).__name__:
            raise CheckpointError(
                f"the optimizer state was saved by {state_dict['method']}, but this run uses "
                f"{type(self).__name__}: resume with the same optimizer"
            )
        try:
            self.base_optimizer.load_state_dict(state_dict["base"])
        except ValueError as exc:
            raise CheckpointError(f"the base optimizer state does not fit this model's parameters: {exc}") from exc
        # load_state_dict rebuilds the base optimizer's group list; share it again.
        self.param_groups = self.base_optimizer.param_groups
        self.steps_taken = int(state_dict["steps_taken"])
        self._load_method_state(state_dict["method_state"])


class FSAM(SAM):
    """Friendly-SAM: perturb along the gradient minus an EMA estimate of the full-batch gradient.

    The EMA ``m`` of the raw clean gradients is kept per parameter. On the first step of each parameter
    ``m <- g`` and ``d = g`` (so step 1 is plain SAM). After that, with ``ema_order="code"`` (the authors'
    released code, the default): ``d = g - sigma * m_{t-1}``, then ``m_t = lmbda * m_{t-1} + (1 - lmbda) * g``.
    With ``ema_order="paper"``: ``m_t`` first, then ``d = g - sigma * m_t``. The EMA always sees the raw g.

    Args:
        sigma: how much of the EMA to remove, >= 0 (1 removes all of it).
        lmbda: EMA decay in [0, 1) (the released recipe: 0.6; earlier 0.95).
        ema_order: "code" or "paper", as above. They agree after normalisation when sigma = 1.
        perturbation: only ``"minibatch"``, F-SAM's own direction: the Figure-1 analysis directions replace it,
            so they belong to :class:`SAM`, and any other value is refused.
        Everything else as :class:`SAM`.
    """

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        rho: float | None = None,
        sigma: float = 1.0,
        lmbda: float = 0.6,
        ema_order: str = "code",
        adaptive: bool = False,
        eta: float = 0.0,
        perturbation: str = "minibatch",
        **base_kwargs: Any,
    ) -> None:
        _check_range("sigma", sigma, sigma >= 0, ">= 0 (the share of the EMA removed from the gradient)")
        _check_range("lmbda", lmbda, 0 <= lmbda < 1, "in [0, 1) (the EMA decay)")
        if ema_order not in ("code", "paper"):
            raise ValueError(f"ema_order={ema_order!r} is not allowed: ema_order must be 'code' or 'paper'")
        if perturbation != "minibatch":
            # Named here, not left to **base_kwargs: SAM would take it and replace F-SAM's direction with its own.
            raise ValueError(
                f"perturbation={perturbation!r} is not allowed: FSAM perturbs along its own direction, g - sigma * EMA "
                "(perturbation='minibatch'); the analysis directions 'full' and 'noise' belong to SAM"
            )
        self._fsam_hyper = dict(sigma=sigma, lmbda=lmbda, ema_order=ema_order)
        self._fresh_this_step: list[torch.Tensor] = []
        self._backed_up: list[torch.Tensor] = []
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)

    @staticmethod
    def _method_name(adaptive: bool) -> str:
        return "fasam" if adaptive else "fsam"

    def _method_defaults(self, **kwargs: Any) -> dict[str, Any]:
        return {**kwargs, **self._fsam_hyper}

    def _make_direction(self, group: dict[str, Any], params: list[torch.Tensor], revertible: bool) -> None:
        sigma, lmbda = group["sigma"], group["lmbda"]
        fresh = [p for p in params if "ema" not in self.state[p]]
        seen = [p for p in params if "ema" in self.state[p]]
        if fresh:
            for p in fresh:
                self.state[p]["ema"] = torch.empty_like(p, memory_format=torch.preserve_format)
            torch._foreach_copy_([self.state[p]["ema"] for p in fresh], [p.grad for p in fresh])
            self._fresh_this_step.extend(fresh)
        if not seen:
            return
        grads = [p.grad for p in seen]
        emas = [self.state[p]["ema"] for p in seen]
        if revertible:
            backups = []
            for p in seen:
                state = self.state[p]
                if "ema_backup" not in state:
                    state["ema_backup"] = torch.empty_like(p, memory_format=torch.preserve_format)
                backups.append(state["ema_backup"])
            torch._foreach_copy_(backups, emas)
            self._backed_up.extend(seen)
        if group["ema_order"] == "paper":
            torch._foreach_lerp_(emas, grads, 1.0 - lmbda)
            torch._foreach_add_(grads, emas, alpha=-sigma)
        else:
            # d = g - sigma*m_{t-1} in place; then m_t = lmbda*m_{t-1} + (1-lmbda)*g rewritten with g = d + sigma*m_{t-1}
            # as (lmbda + sigma*(1-lmbda))*m_{t-1} + (1-lmbda)*d, so no copy of g is needed.
            torch._foreach_add_(grads, emas, alpha=-sigma)
            if sigma != 1.0:  # at sigma = 1 the factor is exactly 1: skip a pass over the EMA
                torch._foreach_mul_(emas, lmbda + sigma * (1.0 - lmbda))
            torch._foreach_add_(emas, grads, alpha=1.0 - lmbda)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True, *, revertible: bool = False) -> None:
        self._fresh_this_step, self._backed_up = [], []
        super().first_step(zero_grad, revertible=revertible)

    def _revert_direction_state(self) -> None:
        for p in self._fresh_this_step:
            del self.state[p]["ema"]
        if self._backed_up:
            torch._foreach_copy_(
                [self.state[p]["ema"] for p in self._backed_up], [self.state[p]["ema_backup"] for p in self._backed_up]
            )
        self._fresh_this_step, self._backed_up = [], []

    def ema_estimate(self) -> list[torch.Tensor | None]:
        """The EMA m of the raw gradients (F-SAM's estimate of the full-batch gradient), one tensor per parameter
        in param-group order, None for a parameter that has not taken a step. The tensors are the optimizer's own:
        read them, do not change them."""
        return [self.state[p].get("ema") for p in self._ordered_params()]

    def _method_state(self) -> dict[str, Any]:
        params = self._ordered_params()
        return {"ema": [self.state[p]["ema"].detach().clone() if "ema" in self.state[p] else None for p in params]}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        params = self._ordered_params()
        emas = state["ema"]
        if len(emas) != len(params):
            raise CheckpointError(
                f"the F-SAM state holds an EMA for {len(emas)} parameter tensors, this model has {len(params)}: "
                "the checkpoint is from a different model"
            )
        for index, (p, ema) in enumerate(zip(params, emas)):
            if ema is None:
                self.state[p].pop("ema", None)
                continue
            if ema.shape != p.shape:
                raise CheckpointError(
                    f"the F-SAM EMA of parameter {index} has shape {tuple(ema.shape)}, the model's parameter has "
                    f"{tuple(p.shape)}: the checkpoint is from a different model"
                )
            self.state[p]["ema"] = ema.to(device=p.device, dtype=p.dtype).clone()
