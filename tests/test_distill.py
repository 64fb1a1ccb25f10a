"""Hidden-state distillation and token augmentation for fine-tuning (recover.finetune, recover.augment).

The tiny encoder has random weights: these are structure and arithmetic checks; the held-out gain on
the real MiniLM is in test_minilm_slow.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_models import export_tiny_encoder, token_batch

from pycompress.errors import PycompressError
from pycompress.fidelity.session import run_model
from pycompress.ir import load_model
from pycompress.plan import LayerDecision, Plan
from pycompress.recover.augment import TokenAugmenter
from pycompress.recover.finetune import _Distillation, finetune, hidden_states
from pycompress.recover.torch_graph import TorchGraph
from pycompress.rewrites import apply_plan

CLS, SEP = 1, 2


def _sentences(n: int, t: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded token batches framed as [CLS] tokens [SEP], like a tokenizer writes them."""
    batch = token_batch(n, t, seed)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ids[ids == CLS], ids[ids == SEP] = 3, 3                 # the markers appear only as markers
    lengths = mask.sum(1)
    ids[:, 0], ids[np.arange(n), lengths - 1] = CLS, SEP
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    teacher = load_model(export_tiny_encoder(tmp_path_factory.mktemp("distill") / "encoder.onnx"))
    student = teacher.clone()
    apply_plan(student, Plan([LayerDecision("/layers.0/up/MatMul", "svd", {"rank": 4}),
                              LayerDecision("/layers.1/up/MatMul", "svd", {"rank": 4})]))
    return teacher, student


def test_new_sequences_are_framed_padded_and_made_of_spans_of_the_sentences():
    data = _sentences(40)
    rng = np.random.default_rng(0)
    new = TokenAugmenter(data, replace=0.0).sample(300, rng)
    ids, mask = new["input_ids"], new["attention_mask"]
    lengths = mask.sum(1)
    assert ids.shape == (300, 12) and ids.dtype == data["input_ids"].dtype
    assert np.array_equal(mask != 0, np.arange(12)[None, :] < lengths[:, None])       # right padding
    assert (ids[:, 0] == CLS).all() and (ids[np.arange(300), lengths - 1] == SEP).all()
    assert (ids[mask == 0] == 0).all() and (new["token_type_ids"] == 0).all()
    # Without replacement the inside is one span, or two spans joined once: at most one bigram
    # that no sentence has.
    inner = [row[1:n - 1] for row, n in zip(data["input_ids"], data["attention_mask"].sum(1))]
    bigrams = {(int(a), int(b)) for s in inner for a, b in zip(s[:-1], s[1:])}
    tokens = set(np.concatenate(inner).tolist())
    unseen = []
    for row, n in zip(ids, lengths):
        body = row[1:n - 1]
        assert set(body.tolist()) <= tokens and len(body) >= 1
        unseen.append(sum((int(a), int(b)) not in bigrams for a, b in zip(body[:-1], body[1:])))
    assert max(unseen) <= 1 and 0 < sum(unseen)          # joins happen, and at most one per sequence
    assert len({row.tobytes() for row in ids}) > 150      # new sequences, not copies of 40 sentences
    again = TokenAugmenter(data, replace=0.0).sample(300, np.random.default_rng(0))
    assert np.array_equal(again["input_ids"], ids)        # the generator decides everything


def test_replacement_swaps_about_the_asked_share_of_tokens():
    data = _sentences(40)
    rng = np.random.default_rng(1)
    kept = TokenAugmenter(data, replace=0.0).sample(400, np.random.default_rng(1))
    swapped = TokenAugmenter(data, replace=0.5).sample(400, rng)
    inner = [row[1:n - 1] for row, n in zip(data["input_ids"], data["attention_mask"].sum(1))]
    bigrams = {(int(a), int(b)) for s in inner for a, b in zip(s[:-1], s[1:])}

    def unseen_share(batch):
        pairs = [(int(a), int(b)) for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))
                 for a, b in zip(row[1:n - 2], row[2:n - 1])]
        return np.mean([p not in bigrams for p in pairs])
    assert unseen_share(swapped) > unseen_share(kept) + 0.3


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("attention_mask"), "needs the inputs 'input_ids' and 'attention_mask'"),
    (lambda d: d["input_ids"].__setitem__((3, 0), 7), "start and end with the same special tokens"),
    (lambda d: d.update(attention_mask=d["attention_mask"][:, ::-1].copy()), "right padding"),
    (lambda d: d["token_type_ids"].__setitem__((0, 0), 1), "input 'token_type_ids' is not a constant"),
    (lambda d: d["input_ids"].__setitem__((0, -1), 9) if d["attention_mask"][0, -1] == 0 else
     d["input_ids"].__setitem__((1, -1), 9), "padding positions hold more than one token id"),
])
def test_augmenter_refuses_data_it_cannot_imitate_in_one_line(change, message):
    data = _sentences(20, seed=3)
    assert (data["attention_mask"][:2, -1] == 0).any()
    change(data)
    with pytest.raises(PycompressError, match=message) as err:
        TokenAugmenter(data)
    assert "\n" not in str(err.value) and str(err.value).startswith("--finetune-augment")


def test_hidden_states_are_the_layer_norm_outputs_both_graphs_have(encoder):
    teacher, student = encoder
    names = hidden_states(teacher, student)
    assert names == [n.outputs[0].name for n in teacher.graph if n.op_type == "LayerNormalization"]
    assert len(names) == 4                                # two per layer: after attention, after the FFN
    renamed = student.clone()
    node = next(n for n in renamed.graph if n.op_type == "LayerNormalization")
    node.outputs[0].name = "elsewhere"
    assert hidden_states(teacher, renamed) == names[1:]


def test_distillation_loss_is_the_relative_output_error_plus_the_mean_masked_state_errors(encoder):
    teacher, student = encoder
    names = hidden_states(teacher, student)
    data = {k: v for k, v in _sentences(16, seed=4).items() if k != "token_type_ids"}
    distill = _Distillation(teacher, "embedding", names, threads=1)
    distill.set_scales(data)
    graph = TorchGraph(student, extra_outputs=names)
    outs = graph({k: torch.from_numpy(v) for k, v in data.items()})
    loss = float(distill.loss(outs[0], outs[1:], data))

    tt = distill.teacher(data)
    reference = run_model(teacher, data)[0].astype(np.float64)
    m = data["attention_mask"].astype(np.float64)[..., None]
    scales = [float(np.mean(tt[0].numpy().astype(np.float64) ** 2))] + \
        [float((np.mean(h.numpy().astype(np.float64) ** 2, axis=2, keepdims=True) * m).sum() / m.sum()) for h in tt[1:]]
    assert np.allclose(distill.scales, scales, rtol=1e-5)
    q = outs[0].detach().numpy().astype(np.float64)
    assert np.allclose(tt[0].numpy(), reference, atol=1e-6)
    expected_out = np.mean((q - reference) ** 2) / scales[0]
    states = [float((np.mean((h.detach().numpy() - g.numpy()) ** 2, axis=2, keepdims=True) * m).sum() / m.sum()) / s
              for h, g, s in zip(outs[1:], tt[1:], scales[1:])]
    assert loss == pytest.approx(expected_out + np.mean(states), rel=1e-4)
    assert min(states) > 0                                # the factored layers change every later state


def test_hidden_and_augmented_finetuning_runs_trains_more_samples_and_verifies(encoder):
    teacher, student = encoder
    data = _sentences(120, seed=5)
    data.pop("token_type_ids")
    lines: list[str] = []
    trained = student.clone()
    report = finetune(teacher, trained, data, epochs=2, lr=1e-3, optimizer="adam", batch_size=16, hidden=True,
                      augment=3, progress=lines.append)
    assert report.settings["hidden_states"] == hidden_states(teacher, student) and report.settings["augment"] == 3
    assert any("108 training (+ 3 new sequences each per epoch), 4 hidden states distilled" in line for line in lines)
    assert report.kept and report.after.loss < report.before.loss
    assert report.verification["max_abs_diff"] <= report.verification["tolerance"]


def test_finetune_hidden_on_a_model_without_layer_norms_and_augment_with_labels_fail_clearly(encoder, tmp_path,
                                                                                              capsys):
    import zoo
    from conftest import export

    from pycompress.cli import main

    teacher, student = encoder
    data = _sentences(20)
    with pytest.raises(PycompressError, match="cannot be used with labels"):
        finetune(teacher, student.clone(), data, labels=np.zeros(20, np.int64), augment=1)
    torch.manual_seed(0)
    path = export(zoo.MLP((64, 32, 10)), (1, 64), tmp_path / "mlp.onnx")
    mlp = load_model(path)
    with pytest.raises(PycompressError, match="--finetune-hidden: no LayerNormalization"):
        finetune(mlp, mlp.clone(), {mlp.graph.inputs[0].name: np.zeros((8, 64), np.float32)}, hidden=True,
                 trainable="all")
    # The CLI refuses a negative count before any work (the search would run first otherwise).
    assert main(["compress", str(path), "--data", "builtin:digits", "-o", str(tmp_path / "s.onnx"),
                 "--finetune-augment", "-1"]) == 2
    assert "--finetune-augment -1: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "s.run").exists()
