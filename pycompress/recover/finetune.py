"""Gradient fine-tuning of a compressed ONNX model against its teacher (ALGORITHMS.md 4).

The CramNet loss on the chosen output (its logits), per batch::

    L = mean_j (q_j - p_j)^2  +  label_weight * CE(softmax(q), labels)       (CE only with labels)

with ``p`` the teacher's pre-softmax output (computed once with onnxruntime,
cached) and ``q`` the student's. RMSProp by default (CramNet found other
optimizers failed to move the weights of deep layers).

Deviation from ALGORITHMS.md 4 / the issue (which ask for the user's PyTorch
model and a re-export): the student is the compressed ONNX graph itself,
executed by ``TorchGraph``; only initializer values change, so the rewrites'
structure (factored pairs, pruned shapes, shared codebooks with fixed uint8
indices) is kept exactly, nothing is re-exported, and any model
``pycompress`` compressed can be fine-tuned.

Hidden-state distillation (``hidden=True``, after TinyBERT): the loss also
matches the teacher's intermediate states that the student still has by name
and width, the outputs of its LayerNormalization nodes (a transformer's
residual stream; pruning heads or FFN width and factoring linears keep it),
per token with padding masked::

    L = |q - p|^2 / mean(p^2)  +  mean_l  |h_l - t_l|^2 / mean(t_l^2)

One sentence then gives tokens x layers x width targets instead of one pooled
vector. With ``augment`` > 0, each epoch also trains on that many new token
sequences per training sample (``recover.augment``), labelled by the teacher
on the fly. On MiniLM at 0.70x MACs with its 400 calibration sentences both
together raise the held-out cosine from 0.934 to 0.95 (docs/transformers.md),
where plain fine-tuning on the same sentences reached 0.936.

Keep-only-if-better, like the closed-form recovery: a held-out split of the
data (never trained on) is scored before training and after every epoch; the
best epoch is kept only if its held-out loss is lower than before training,
otherwise the student is left untouched. After writing back, the student is
re-verified: onnxruntime must reproduce the torch outputs and the ONNX
checker must pass.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pycompress.errors import PycompressError
from pycompress.fidelity.session import make_session, run_model
from pycompress.ir import check_model
from pycompress.recover.augment import MASK, TokenAugmenter
from pycompress.recover.torch_graph import TorchGraph, batch_norm_statistics

OPTIMIZERS = ("rmsprop", "adam", "sgd")
# RMSProp and Adam take steps of about lr per weight whatever the gradient's
# size (RMSProp divides by the running RMS of the gradient). 1e-3 is Keras'
# RMSProp default, i.e. CramNet's setting; on the digits MLP (svd rank 6, 3
# epochs, docs/finetune.md) 1e-4 recovers half as much. The keep-only-if-better
# rule guards against a rate too large for a model. SGD steps scale with the
# gradient, hence its own default.
DEFAULT_LR = {"rmsprop": 1e-3, "adam": 1e-3, "sgd": 1e-2}
# Without a given rate, these multiples of the default are probed (a quarter epoch each).
LR_PROBE_FACTORS = (1.0, 0.1, 0.01)
LR_PROBE_FRACTION = 0.25
VERIFY_SAMPLES = 16
# Teacher samples that set the scale of each distilled term.
SCALE_SAMPLES = 256
HIDDEN_OPS = ("LayerNormalization",)


@dataclass
class HeldOut:
    """Scores on the held-out split: ``loss`` (the training objective) decides what is kept."""

    loss: float
    mse: float                       # mean squared error to the teacher's output
    agreement: float | None = None   # top-1 agreement with the teacher (2-D class scores)
    accuracy: float | None = None    # with labels
    cosine: float | None = None      # mean cosine to the teacher's output (per sample, flattened)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    heldout: HeldOut
    seconds: float


@dataclass
class FinetuneReport:
    kept: bool
    best_epoch: int                  # 0: nothing better than the compressed model
    before: HeldOut | None           # held-out scores of the student before / after, by onnxruntime
    after: HeldOut | None            # (None: nothing to fine-tune)
    epochs: list[EpochStats] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    trainable_params: int = 0
    train_samples: int = 0
    heldout_indices: list[int] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compressed_initializers(teacher: ir.Model, student: ir.Model) -> set[str]:
    """Floating-point initializers of the student's *compressed layers*: those a rewrite touched.

    A compute node is touched when one of its constant inputs is derived
    (through constant-only nodes, e.g. the shared weight's
    ``Mul(Gather(codebook, Cast(indices)), scale)``) from an initializer that
    is new or changed with respect to the teacher; all floating-point
    initializers feeding a touched node are returned (its weights, bias,
    codebook and scales), except BatchNormalization statistics.
    """
    t_inits, s_inits = teacher.graph.initializers, student.graph.initializers

    def changed(name: str) -> bool:
        old = t_inits.get(name)
        if old is None or old.const_value is None:
            return True
        a, b = old.const_value, s_inits[name].const_value
        return a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) or not np.array_equal(a.numpy(), b.numpy())

    sources: dict[str, set[str]] = {name: {name} for name in s_inits}   # constant value -> its initializers
    touched_sources: set[str] = set()
    for node in student.graph:
        names = [v.name for v in node.inputs if v is not None and v.name]
        if names and all(n in sources for n in names):          # a constant-only node: propagate
            for out in node.outputs:
                sources[out.name] = set().union(*(sources[n] for n in names))
            continue
        feeding = set().union(*(sources[n] for n in names if n in sources)) if names else set()
        if any(changed(n) for n in feeding):
            touched_sources |= feeding
    stats = batch_norm_statistics(student)
    return {n for n in touched_sources
            if s_inits[n].const_value is not None and s_inits[n].const_value.dtype.is_floating_point()
            and n not in stats}


def hidden_states(teacher: ir.Model, student: ir.Model) -> list[str]:
    """Intermediate states to distil: outputs of the student's LayerNormalization nodes that the teacher
    has under the same name (a transformer's residual stream, in graph order)."""
    ours = {n.outputs[0].name for n in teacher.graph if n.op_type in HIDDEN_OPS}
    return [n.outputs[0].name for n in student.graph if n.op_type in HIDDEN_OPS and n.outputs[0].name in ours]


def _token_weights(feeds: Mapping[str, np.ndarray], state: torch.Tensor) -> torch.Tensor | None:
    """[B, S, 1] weights of the real tokens (the attention mask) for a [B, S, ...] state, else None."""
    mask = feeds.get(MASK)
    if mask is None or state.dim() < 3 or tuple(mask.shape) != tuple(state.shape[:2]):
        return None
    return torch.from_numpy(np.asarray(mask)).to(state.dtype).unsqueeze(-1)


def _mean_square(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x ** 2`` over every element, or over the weighted (real) tokens."""
    if weights is None:
        return (x ** 2).mean()
    per_token = (x ** 2).flatten(2).mean(2, keepdim=True)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def _split(n: int, fraction: float, rng: np.random.Generator,
           groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices: about ``fraction`` of the samples held out at random, or, with
    ``groups``, as whole groups (e.g. every crop of one photo).

    Why groups: crops of one photo overlap and share its statistics; a
    validation split of random crops then tracks the training photos, not new
    ones (on EfficientNet-Lite0 it kept fine-tuning that lost agreement on
    unseen photos, docs/finetune.md).
    """
    if not 0.0 < fraction < 1.0:
        raise PycompressError(f"validation fraction {fraction}: must be in (0, 1)")
    if groups is None:
        held = max(1, int(round(n * fraction)))
        if n - held < 1:
            raise PycompressError(f"fine-tuning needs at least 2 samples, got {n}")
        order = rng.permutation(n)
        return np.sort(order[held:]), np.sort(order[:held])
    names, counts = np.unique(groups, return_counts=True)
    if len(names) < 2:
        raise PycompressError(f"fine-tuning by groups needs at least 2 groups, got {len(names)}")
    wanted = max(1, round(len(groups) * fraction))
    held_names: list = []
    total = 0
    for i in rng.permutation(len(names)):
        if (held_names and total >= wanted) or len(held_names) == len(names) - 1:   # train on one group at least
            break
        held_names.append(names[i])
        total += int(counts[i])
    mask = np.isin(groups, held_names)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _scores(student_out: np.ndarray, teacher_out: np.ndarray, labels: np.ndarray | None,
            label_weight: float) -> HeldOut:
    q = torch.from_numpy(student_out.astype(np.float32))
    p = torch.from_numpy(teacher_out.astype(np.float32))
    mse = float(F.mse_loss(q, p))
    loss = mse
    agreement = accuracy = None
    cosine = float(F.cosine_similarity(q.flatten(1), p.flatten(1), dim=1).mean()) if q.dim() >= 2 else None
    unit_rows = q.dim() == 2 and bool(torch.allclose(p.norm(dim=1), torch.ones(len(p)), atol=1e-3))
    if q.dim() == 2 and not unit_rows:      # class scores; an argmax over embedding dimensions means nothing
        agreement = float((q.argmax(1) == p.argmax(1)).float().mean())
    if labels is not None:
        y = torch.from_numpy(labels)
        loss += label_weight * float(F.cross_entropy(q, y))
        accuracy = float((q.argmax(1) == y).float().mean())
    return HeldOut(loss=loss, mse=mse, agreement=agreement, accuracy=accuracy, cosine=cosine)


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        # alpha = 0.9 as in Keras (CramNet's setup); torch's 0.99 makes the first steps ~10x lr.
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise PycompressError(f"optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")


def finetune(teacher: ir.Model, student: ir.Model, inputs: Mapping[str, np.ndarray],
             labels: np.ndarray | None = None, *, epochs: int = 3, lr: float | None = None, batch_size: int = 64,
             optimizer: str = "rmsprop", label_weight: float = 1.0, validation_fraction: float = 0.1,
             trainable: str | set[str] = "compressed", output: str | None = None, seed: int = 0,
             progress: Callable[[str], None] | None = None, threads: int | None = None,
             verify_tolerance: float = 1e-4, groups: np.ndarray | None = None, hidden: bool = False,
             augment: int = 0) -> FinetuneReport:
    """Fine-tune ``student``'s initializers in place (kept only if the held-out loss drops).

    ``inputs``: {graph input: [N, ...]} (the calibration data); ``labels``: [N]
    class indices or None. ``trainable``: "compressed" (initializers of the
    layers the rewrites touched, see ``compressed_initializers``), "all", or a
    set of initializer names. ``output``: the graph output treated as logits
    (default: the first). ``verify_tolerance``: max |onnxruntime - torch| allowed
    after writing back, relative to max(1, max |output|). ``lr``: None probes
    ``DEFAULT_LR[optimizer]`` times 1, 0.1 and 0.01 for a quarter epoch each
    from the same start and trains with the one of lowest held-out loss
    (``settings["lr_probe"]`` in the report). ``groups``: [N] the source of
    each sample (e.g. the photo a crop came from); when given, the validation
    split is whole groups (about ``validation_fraction`` of the samples), so
    keep-only-if-better judges on sources never trained on. ``hidden``: also
    distil the intermediate states of ``hidden_states`` (module docstring).
    ``augment``: new token sequences per training sample per epoch
    (``recover.augment.TokenAugmenter``; unlabeled data only).
    """
    started = time.monotonic()
    if optimizer not in OPTIMIZERS:
        raise PycompressError(f"--finetune-optimizer {optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    probe_rates = None if lr is not None else [DEFAULT_LR[optimizer] * f for f in LR_PROBE_FACTORS]
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise PycompressError(f"fine-tuning learning rate {lr}: must be a positive number")
    if epochs < 1 or batch_size < 1:
        raise PycompressError("fine-tuning needs epochs >= 1 and batch_size >= 1")
    if augment < 0:
        raise PycompressError(f"--finetune-augment {augment}: must be 0 or more")
    if augment and labels is not None:
        raise PycompressError("--finetune-augment makes unlabeled sequences; it cannot be used with labels")
    log = progress or (lambda line: None)
    outputs = [v.name for v in student.graph.outputs]
    output = output or outputs[0]
    if output not in outputs:
        raise PycompressError(f"output '{output}' is not an output of the model (outputs: {', '.join(outputs)})")
    k = outputs.index(output)
    n = len(next(iter(inputs.values())))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise PycompressError(f"fine-tuning labels: need {n} integer class indices, got shape {labels.shape} "
                                  f"of {labels.dtype}")
        labels = labels.astype(np.int64)

    if trainable == "compressed":
        names = compressed_initializers(teacher, student)
        if not names:
            log("finetune: no compressed layer (the student has the teacher's weights); nothing to fine-tune")
            return FinetuneReport(kept=False, best_epoch=0, before=None, after=None,
                                  settings={"skipped": "no compressed layer"},
                                  seconds=time.monotonic() - started)
    elif trainable == "all":
        names = None
    else:
        names = set(trainable)
    states = hidden_states(teacher, student) if hidden else []
    if hidden and not states:
        raise PycompressError("--finetune-hidden: no LayerNormalization output of the compressed model is in "
                              "the original too; hidden-state distillation is for transformer encoders")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        graph = TorchGraph(student, names, extra_outputs=states)
        params = graph.trainable_parameters()
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (n,):
                raise PycompressError(f"fine-tuning groups: need one per sample ({n}), got shape {groups.shape}")
        train_idx, held_idx = _split(n, validation_fraction, rng, groups)
        log(f"finetune: teacher outputs on {n} samples (onnxruntime)")
        teacher_out = run_model(teacher, inputs, threads=threads)[k].astype(np.float32)
        if labels is not None and (teacher_out.ndim != 2 or labels.max() >= teacher_out.shape[1] or labels.min() < 0):
            raise PycompressError(f"fine-tuning labels: output '{output}' of shape {teacher_out.shape} is not "
                                  "[N, classes] logits covering the labels")
        held_inputs = {name: inputs[name][held_idx] for name in graph.input_names}
        held_labels = None if labels is None else labels[held_idx]
        before = _scores(run_model(student, held_inputs, threads=threads)[k], teacher_out[held_idx], held_labels,
                         label_weight)

        def heldout_scores() -> HeldOut:
            return _scores(graph.run(held_inputs, batch_size=4 * batch_size)[k], teacher_out[held_idx],
                           held_labels, label_weight)

        start = heldout_scores()
        count = sum(p.numel() for p in params)
        teacher_t = torch.from_numpy(teacher_out)
        labels_t = None if labels is None else torch.from_numpy(labels)
        augmenter = None
        if augment:
            augmenter = TokenAugmenter({name: np.asarray(inputs[name][train_idx]) for name in graph.input_names})
        distill = _Distillation(teacher, output, states, threads) if states or augment else None
        if distill is not None:
            distill.set_scales({name: np.asarray(inputs[name][train_idx[:SCALE_SAMPLES]])
                                for name in graph.input_names})

        def train(opt: torch.optim.Optimizer, order: np.ndarray, desc: str) -> tuple[float, int]:
            """One pass over ``order`` in batches; (summed loss, samples). With ``augment``, the pass
            also visits ``augment`` new sequences per sample of ``order``, shuffled in."""
            if augmenter is None:       # index the (possibly lazy) inputs batch by batch
                data, visit = inputs, order
            else:
                extra = augmenter.sample(augment * len(order), rng)
                data = {name: np.concatenate([np.asarray(inputs[name][order]), extra[name]])
                        for name in graph.input_names}
                visit = rng.permutation((augment + 1) * len(order))
            batches = range(0, len(visit), batch_size)
            if progress is not None:
                batches = tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr)
            total, seen = 0.0, 0
            for start_at in batches:
                at = visit[start_at:start_at + batch_size]
                idx = at if augmenter is None else None     # real samples: labels and cached outputs
                batch = {name: np.asarray(data[name][at]) for name in graph.input_names}
                outs = graph({name: torch.from_numpy(array) for name, array in batch.items()})
                q = outs[k]
                if distill is None:
                    loss = F.mse_loss(q, teacher_t[idx])
                else:
                    loss = distill.loss(q, outs[len(outputs):], batch)
                if labels_t is not None:
                    loss = loss + label_weight * F.cross_entropy(q, labels_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(at)
                seen += len(at)
            return total, seen

        probe: dict[float, float] = {}
        if probe_rates is not None:
            # No learning rate given: the default's scale suits a model trained from scratch (the digits
            # MLP) and wrecks pretrained ones (MiniLM: held-out cosine 0.93 -> 0.75 at RMSProp 1e-3;
            # EfficientNet-Lite0's shared codebooks need 1e-5; docs/finetune.md). Each candidate trains
            # a quarter epoch from the same start; the lowest held-out loss picks the rate.
            initial = graph.state_arrays()
            order = rng.permutation(train_idx)
            few = order[:max(batch_size, int(math.ceil(LR_PROBE_FRACTION * len(order) / batch_size)) * batch_size)]
            for rate in probe_rates:
                graph.load_arrays(initial)
                total, _ = train(_optimizer(optimizer, params, rate), few, f"finetune lr probe {rate:g}")
                probe[rate] = heldout_scores().loss if math.isfinite(total) else math.inf
                log(f"finetune: learning-rate probe {rate:g}: held-out loss {probe[rate]:.5g} after "
                    f"{len(few)} samples (before {start.loss:.5g})")
            graph.load_arrays(initial)
            lr = min(probe_rates, key=lambda rate: probe[rate])
        extra = (f" (+ {augment} new sequences each per epoch)" if augment else "") + \
            (f", {len(states)} hidden states distilled" if states else "")
        log(f"finetune: {len(params)} initializers ({count} weights) trainable, {len(train_idx)} training{extra} / "
            f"{len(held_idx)} held-out samples, {optimizer} lr={lr:g}; held-out loss {start.loss:.5g}")
        opt = _optimizer(optimizer, params, lr)
        best, best_epoch, best_state = start.loss, 0, None
        history: list[EpochStats] = []
        for epoch in range(1, epochs + 1):
            t0 = time.monotonic()
            total, seen = train(opt, rng.permutation(train_idx), f"finetune epoch {epoch}")
            if not math.isfinite(total):
                log(f"finetune epoch {epoch}: the loss diverged; stopping (lower --finetune-lr)")
                break
            scores = heldout_scores()
            history.append(EpochStats(epoch, total / seen, scores, time.monotonic() - t0))
            extra = "".join(f", {name} {v:.4f}" for name, v in (("agreement", scores.agreement),
                                                                 ("accuracy", scores.accuracy),
                                                                 ("cosine", scores.cosine)) if v is not None)
            log(f"finetune epoch {epoch}/{epochs}: train loss {total / seen:.5g}, held-out loss {scores.loss:.5g} "
                f"(before {start.loss:.5g}), mse {scores.mse:.5g}{extra}")
            if scores.loss < best:
                best, best_epoch, best_state = scores.loss, epoch, graph.state_arrays()

        report = FinetuneReport(kept=best_state is not None, best_epoch=best_epoch, before=before, after=before,
                                epochs=history, trainable=list(graph.trainable_names), trainable_params=count,
                                train_samples=int(len(train_idx)), heldout_indices=[int(i) for i in held_idx],
                                settings={"epochs": epochs, "lr": lr, "optimizer": optimizer,
                                          "lr_probe": {f"{rate:g}": loss for rate, loss in probe.items()} or None,
                                          "batch_size": batch_size, "label_weight": label_weight,
                                          "labels": labels is not None, "validation_fraction": validation_fraction,
                                          "validation_groups": None if groups is None
                                          else sorted(np.unique(groups[held_idx]).tolist()),
                                          "hidden_states": states, "augment": augment,
                                          "output": output, "seed": seed, "trainable": trainable
                                          if isinstance(trainable, str) else "given"})
        if best_state is None:
            log("finetune: no epoch lowered the held-out loss; the model is left as it was")
        else:
            graph.load_arrays(best_state)
            report.verification = _write_back_and_verify(graph, student, held_inputs, verify_tolerance)
            report.after = _scores(run_model(student, held_inputs, threads=threads)[k], teacher_out[held_idx],
                                   held_labels, label_weight)
            log(f"finetune: kept epoch {best_epoch}; held-out loss {before.loss:.5g} -> {report.after.loss:.5g} "
                f"(onnxruntime, max |ort - torch| {report.verification['max_abs_diff']:.2g})")
    finally:
        torch.set_num_threads(previous_threads)
    report.seconds = time.monotonic() - started
    return report


class _Distillation:
    """The loss of hidden-state distillation and/or augmented inputs, with the teacher run per batch
    (onnxruntime; new sequences have no cached outputs, and the hidden states of a whole calibration
    set would not fit in memory)."""

    def __init__(self, teacher: ir.Model, output: str, states: list[str], threads: int | None):
        self.names = [output, *states]
        self.session = make_session(teacher, threads=threads, extra_outputs=states)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.scales: list[float] = []

    def teacher(self, batch: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        outs = self.session.run(self.names, {name: batch[name] for name in self.inputs})
        return [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs]

    def set_scales(self, batch: Mapping[str, np.ndarray]) -> None:
        """Each term is relative to the teacher's mean square there, so no layer's scale dominates."""
        targets = self.teacher(batch)
        self.scales = [max(float(_mean_square(t, _token_weights(batch, t))), 1e-12) for t in targets]

    def loss(self, q: torch.Tensor, states: list[torch.Tensor], batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        targets = self.teacher(batch)
        loss = F.mse_loss(q, targets[0]) / self.scales[0]
        terms = []
        for name, h, t, scale in zip(self.names[1:], states, targets[1:], self.scales[1:]):
            if tuple(h.shape) != tuple(t.shape):
                raise PycompressError(f"--finetune-hidden: '{name}' is {tuple(h.shape)} in the compressed model "
                                      f"and {tuple(t.shape)} in the original; cannot distil it")
            terms.append(_mean_square(h - t, _token_weights(batch, t)) / scale)
        return loss + torch.stack(terms).mean() if terms else loss


def _write_back_and_verify(graph: TorchGraph, student: ir.Model, held_inputs: Mapping[str, np.ndarray],
                           tolerance: float) -> dict[str, Any]:
    """Write the trained values into ``student``; onnxruntime must reproduce torch and the checker pass.

    On failure the student gets its previous values back and PycompressError is raised.
    """
    structure = _structure(student)
    previous = {name: student.graph.initializers[name].const_value for name in graph.trainable_names}
    graph.write_back(student)
    few = {name: array[:VERIFY_SAMPLES] for name, array in held_inputs.items()}
    try:
        if _structure(student) != structure:
            raise PycompressError("fine-tuning changed the graph structure; not written")
        check_model(student, where="fine-tuned model")
        expected = graph.run(few)
        actual = run_model(student, few)
        diff, scale = 0.0, 1.0
        for e, a in zip(expected, actual):
            diff = max(diff, float(np.max(np.abs(e.astype(np.float64) - a))) if e.size else 0.0)
            scale = max(scale, float(np.max(np.abs(a))) if a.size else 0.0)
        if not diff <= tolerance * scale:
            raise PycompressError(f"fine-tuned model: onnxruntime differs from the trained torch graph by "
                                  f"{diff:.3g} (allowed {tolerance * scale:.3g}); not written")
    except Exception:
        for name, tensor in previous.items():
            student.graph.initializers[name].const_value = tensor
        raise
    return {"samples": int(len(next(iter(few.values())))), "max_abs_diff": diff, "tolerance": tolerance * scale,
            "checker": "passed"}


def _structure(model: ir.Model) -> tuple:
    """Node ops and wiring, initializer names, dtypes and shapes: what fine-tuning must not change."""
    nodes = tuple((n.op_type, tuple(v.name if v is not None else "" for v in n.inputs)) for n in model.graph)
    inits = tuple(sorted((name, int(v.const_value.dtype), tuple(v.const_value.shape))
                         for name, v in model.graph.initializers.items() if v.const_value is not None))
    return nodes, inits
