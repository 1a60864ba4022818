"""The training loop and checkpoints of ``lora`` and ``pretrain``: mlx-lm's compiled step plus exact resume
(randomness and data order follow from (seed, step)), float32 masters for half precision, gradient clipping,
the RePo position warm-up, and a checkpoint on Ctrl-C or SIGTERM. Each command brings its loss and batches."""

import math
import signal
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.tuner.trainer import grad_checkpoint as checkpoint_class
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .errors import LoadError
from .files import atomic_file
from .folder_checks import safetensors_header
from .rope import set_position_blend

MASTER = "master/"  # state-file prefix of the float32 master weights


def derived_seed(*ints: int) -> int:
    """A well-mixed 32-bit seed from (seed, stream, counter)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


def sum_of_squares(g: mx.array, block: int = 4096) -> mx.array:
    # In blocks, then over blocks: MLX's CPU reduction adds one element after another
    # in float32 (optim.clip_grad_norm's norm of SmolLM2's 28M-element embedding
    # gradient came out 2% low; this one is within 2e-7).
    x = g.reshape(-1)
    m = x.size - x.size % block
    head = x[:m].reshape(-1, block).square().sum(-1).sum() if m else 0.0
    return head + x[m:].square().sum()


def clip_grad_norm(grad, max_norm: float):
    """``optim.clip_grad_norm`` with an accurate norm on the CPU too: scale
    min(1, max_norm / (norm + 1e-6)), as PyTorch."""
    norm = mx.sqrt(sum(sum_of_squares(g) for _, g in tree_flatten(grad)))
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale, grad), norm


class Trainer:
    """One step at a time; its whole state is (model, optimizer, masters, step).

    ``loss(model, *batch)`` returns ``(value, metrics)``, metrics scalars summed over batches. A
    step runs ``micro_batches`` batches, an update every ``accumulate`` (pretrain: a step is one
    update; lora: mlx-lm's iterations, one batch each). Half-precision trainable weights get
    float32 masters: at lr 7e-5 a bfloat16 rounding step swallows most updates.
    """

    def __init__(self, model, optimizer, loss: Callable, *, seed: int = 0,
                 micro_batches: int = 1, accumulate: int = 1, grad_clip: Optional[float] = None,
                 grad_checkpoint: bool = False, position_warmup: int = 0,
                 master: Optional[dict] = None):
        self.model, self.optimizer, self.seed = model, optimizer, seed
        self.micro_batches, self.accumulate = micro_batches, accumulate
        self.grad_clip, self.position_warmup = grad_clip, position_warmup
        self.world = mx.distributed.init()
        trainable = dict(tree_flatten(model.trainable_parameters()))
        master = master or {}
        self.master = {k: master.get(k, v).astype(mx.float32) for k, v in trainable.items() if v.dtype != mx.float32}
        self.step, self.seen = 0, 0  # steps done; batches since the last update
        self.grad = self.totals = None  # totals: metrics summed since the start or resume
        optimizer.init(self._params())
        if grad_checkpoint and not getattr(type(model.layers[0]), "_repo_checkpointed", False):
            checkpoint_class(model.layers[0])  # patches the class, once
            type(model.layers[0])._repo_checkpointed = True
        self.loss_and_grad = nn.value_and_grad(model, loss)
        self._capture()

    def _capture(self):
        # What a compiled step reads and writes; rebuilt when the state is replaced.
        self.state = [self.model.state, self.optimizer.state, self.master, mx.random.state]
        self._compiled = None

    def _params(self):
        # The model's tree (frozen parts as empty nodes), masters in place of half weights.
        return tree_map_with_path(lambda k, v: self.master.get(k, v), self.model.trainable_parameters())

    def _micro_step(self, batch, prev, update):
        (_, metrics), grad = self.loss_and_grad(self.model, *batch)
        if prev is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev)
        if not update:
            return metrics, mx.array(0.0), grad
        grad = average_gradients(grad)
        if self.master or self.grad_clip is not None:
            grad = tree_map(lambda g: g.astype(mx.float32), grad)
        if self.accumulate > 1:
            grad = tree_map(lambda g: g / self.accumulate, grad)
        norm = mx.array(0.0)
        if self.grad_clip is not None:
            grad, norm = clip_grad_norm(grad, self.grad_clip)
        if self.master:
            new = self.optimizer.apply_gradients(grad, self._params())
            flat = dict(tree_flatten(new))
            self.master.update({k: flat[k] for k in self.master})
            self.model.update(tree_map(lambda n, c: n.astype(c.dtype), new, self.model.trainable_parameters()))
        else:
            self.optimizer.update(self.model, grad)
        return metrics, norm, None

    def blend(self, step: int) -> float:
        """Position blend during the warm-up: 1 (integer positions) at step 0, then 0."""
        k = self.position_warmup
        return max(0.0, 1.0 - step / k) if k else 0.0

    def set_blend(self) -> float:
        """Put the model at the blend of the next step (evaluations see the model as it trains)."""
        blend = self.blend(self.step)
        if self.position_warmup:
            set_position_blend(self.model, blend)
        return blend

    def train_step(self, next_batch: Callable[[], tuple]):
        """One step on the next batches; returns (summed metrics, grad norm or 0)."""
        blend = self.set_blend()
        # The blend is a Python constant inside the graph: compile once it is fixed at 0.
        if blend == 0.0 and self._compiled is None:
            self._compiled = mx.compile(self._micro_step, inputs=self.state, outputs=self.state)
        fn = self._compiled if blend == 0.0 else self._micro_step
        mx.random.seed(derived_seed(self.seed, 1, self.step))  # dropout, resumable anywhere
        total, norm = None, mx.array(0.0)
        for _ in range(self.micro_batches):
            self.seen += 1
            update = self.seen == self.accumulate
            metrics, n, self.grad = fn(next_batch(), self.grad, update)
            if update:
                self.seen, norm = 0, n
            mx.eval(self.state, metrics, norm, self.grad)
            total = metrics if total is None else tuple(a + b for a, b in zip(total, metrics))
        self.step += 1
        self.totals = total if self.totals is None else tuple(a + b for a, b in zip(self.totals, total))
        return total, norm

    def restore(self, weights: dict, optimizer_state: dict, step: int, source) -> None:
        """Continue from a checkpoint's weights (masters or as trained) and optimizer state."""
        current = dict(tree_flatten(self.model.trainable_parameters()))
        if set(weights) != set(current):
            raise LoadError(f"{source} holds other trainable weights than this run's; was it made with the same settings?")
        self.master.update({k: weights[k].astype(mx.float32) for k in self.master})
        self.model.load_weights([(k, v.astype(current[k].dtype)) for k, v in weights.items()], strict=False)
        if set(optimizer_state) != {k for k, _ in tree_flatten(self.optimizer.state)}:
            raise LoadError(f"{source} holds state for another optimizer or model; resume with the same optimizer settings.")
        # The learning rate stays this run's: a schedule recomputes it from the step.
        self.optimizer.state = tree_map_with_path(
            lambda k, now: now if k == "learning_rate" else optimizer_state[k], self.optimizer.state)
        self.step, self.seen, self.grad, self.totals = step, 0, None, None
        self._capture()
        mx.eval(self.state)


def train(trainer: Trainer, next_batch: Callable[[], tuple], *, iters: int,
          steps_per_report: int, steps_per_eval: int, save_every: int,
          report: Callable, evaluate: Callable, save: Callable,
          clear_cache_threshold: int = 0, on_step: Optional[Callable] = None) -> None:
    """Steps up to ``iters``. ``report(step, metrics, grad_norm, steps, seconds)`` gets the metrics
    summed since the last report and over all processes; ``evaluate(step)`` runs on a fresh run's
    step 0, every ``steps_per_eval`` and at the end, ``save(step)`` every ``save_every`` and at the
    end. Ctrl-C or SIGTERM finishes the step, saves and raises KeyboardInterrupt; Ctrl-C again
    stops at once.
    """
    maybe_set_recommended_wired_limit()  # keeps the weights resident on a Mac, as mlx-lm does
    world = trainer.world
    stop = []

    def interrupt(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if world.rank() == 0:
            print("Stopping after this step; saving a checkpoint (Ctrl-C again to quit now)", flush=True)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.model.train()
        if trainer.step == 0:
            trainer.set_blend()
            evaluate(0)
            trainer.model.train()
        window, steps, seconds, saved = None, 0, 0.0, trainer.step or None
        while trainer.step < iters:
            tic = time.perf_counter()
            metrics, norm = trainer.train_step(next_batch)
            loss = metrics[0] if world.size() == 1 else mx.distributed.all_sum(metrics[0], stream=mx.cpu)
            if not math.isfinite(loss.item()):  # nothing of this step is saved
                kept = f"the last checkpoint, of step {saved}, is kept" if saved else "no checkpoint was saved"
                raise LoadError(f"The loss is {loss.item()} at step {trainer.step}: training diverged (is the "
                                f"learning rate too high?); {kept}.")
            if clear_cache_threshold and mx.get_cache_memory() > clear_cache_threshold:
                mx.clear_cache()
            seconds += time.perf_counter() - tic
            window = metrics if window is None else tuple(a + b for a, b in zip(window, metrics))
            steps += 1
            if on_step is not None:
                on_step(trainer)
            step = trainer.step
            if step % steps_per_report == 0 or step == iters:
                # Every process takes part in the sums.
                summed = tuple(mx.distributed.all_sum(m, stream=mx.cpu).item() for m in window)
                report(step, summed, norm.item(), steps, seconds)
                window, steps, seconds = None, 0, 0.0
            if step % steps_per_eval == 0 or step == iters:
                trainer.set_blend()
                evaluate(step)
                trainer.model.train()
            on_boundary = trainer.seen == 0
            if world.size() > 1:  # every process stops at the same step
                flag = mx.distributed.all_sum(mx.array(float(bool(stop))), stream=mx.cpu)
                if flag.item() and not stop:
                    stop.append(signal.SIGINT)
            if step % save_every == 0 or step == iters or (stop and on_boundary):
                save(step)
                saved = step
            if stop and on_boundary:
                raise KeyboardInterrupt
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# One checkpoint format for lora and pretrain: a weights file (the trainable weights as the model
# holds them: for lora, mlx-lm's adapter file) and beside it NAME.state.safetensors with the optimizer
# state, the float32 masters and the step. Both carry the same metadata; files from two different
# saves are a damaged checkpoint.


def state_file(weights_file) -> Path:
    return Path(weights_file).with_suffix(".state.safetensors")


def save_checkpoint(trainer: Trainer, files: List[Path], meta: dict) -> None:
    """The trainer's state in each of ``files`` (and its state file), state first."""
    weights = dict(tree_flatten(trainer.model.trainable_parameters()))
    state = {**dict(tree_flatten(trainer.optimizer.state)), **{MASTER + k: v for k, v in trainer.master.items()}}
    meta = {k: str(v) for k, v in {**meta, "step": trainer.step}.items()}
    for file in files:
        with atomic_file(state_file(file)) as tmp:
            mx.save_safetensors(str(tmp), state, metadata=meta)
        with atomic_file(file) as tmp:
            mx.save_safetensors(str(tmp), weights, metadata=meta)


def read_checkpoint(file: Path):
    """(weights, state, metadata) of an intact checkpoint, or why it is not one (a kill, a full disk)."""
    if not state_file(file).is_file():
        return f"{state_file(file).name} is missing"
    try:
        safetensors_header(file)
        safetensors_header(state_file(file))
        weights, meta = mx.load(str(file), return_metadata=True)
        state, state_meta = mx.load(str(state_file(file)), return_metadata=True)
    except (LoadError, OSError, RuntimeError, ValueError) as e:
        return f"unreadable ({' '.join(str(e).split())[:200]})"
    if state_meta != meta or "step" not in meta:
        return f"its state file is from step {state_meta.get('step')}, the weights from {meta.get('step')}"
    return weights, state, meta


def newest_intact(files: List[Path], where: str) -> Tuple[Path, dict, dict, dict]:
    """(file, weights, state, metadata) of the first intact checkpoint of ``files``
    (newest first), warning about each damaged one before it."""
    for file in files:
        found = read_checkpoint(file)
        if not isinstance(found, str):
            return (file, *found)
        warnings.warn(f"Checkpoint {file} is damaged: {found}; trying the newest one before it.")
    raise LoadError(f"No intact checkpoint in {where} to resume from; start the run again.")


def resume(trainer: Trainer, file: Path, weights: dict, state: dict, meta: dict) -> None:
    """Continue from a checkpoint that ``newest_intact`` found."""
    weights = {**weights, **{k[len(MASTER):]: v for k, v in state.items() if k.startswith(MASTER)}}
    state = {k: v for k, v in state.items() if not k.startswith(MASTER)}
    trainer.restore(weights, state, int(meta["step"]), state_file(file))
