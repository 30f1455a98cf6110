"""Tests for nmsparse.sad: SAD = ||a XOR b||_1 and the SADTracker."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from nmsparse.sad import TENSOR_KEY, SADResult, SADTracker, sad


def m(rows: list[list[int]] | list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# Golden 2x4 pair: row 0 differs at columns 1, 2; row 1 at columns 2, 3 -> SAD 4 of 8.
A24 = m([[1, 1, 0, 0], [0, 1, 0, 1]])
B24 = m([[1, 0, 1, 0], [0, 1, 1, 0]])


# ----------------------------------------------------------------------------- sad()


def test_golden_tensor_pair() -> None:
    r = sad(A24, B24)
    assert isinstance(r, SADResult)
    assert r.per_layer == {TENSOR_KEY: 4}
    assert TENSOR_KEY == ""
    assert r.total == 4
    assert r.numel == 8
    assert r.fraction == 0.5
    assert r.per_layer_numel == {"": 8}
    assert r.per_layer_fraction == {"": 0.5}


def test_golden_two_layer_dict() -> None:
    a = {"fc1": A24, "fc2": m([[1, 1, 0, 0]])}
    b = {"fc1": B24, "fc2": m([[0, 0, 1, 1]])}
    r = sad(a, b)
    assert r.per_layer == {"fc1": 4, "fc2": 4}
    assert list(r.per_layer) == ["fc1", "fc2"]
    assert r.per_layer_numel == {"fc1": 8, "fc2": 4}
    assert r.per_layer_fraction == {"fc1": 0.5, "fc2": 1.0}
    assert r.total == 8
    assert r.numel == 12
    assert r.fraction == pytest.approx(8 / 12)


def test_dict_order_follows_a_and_key_order_of_b_is_irrelevant() -> None:
    a = {"x": A24, "y": B24}
    b = {"y": A24, "x": A24}
    r = sad(a, b)
    assert list(r.per_layer) == ["x", "y"]
    assert r.per_layer == {"x": 0, "y": 4}


def test_identity_and_symmetry_golden() -> None:
    assert sad(A24, A24).total == 0
    assert sad(A24, A24).fraction == 0.0
    assert sad(A24, B24) == sad(B24, A24)
    # Complement flips every position.
    assert sad(A24, ~A24).total == A24.numel()
    assert sad(A24, ~A24).fraction == 1.0


def test_non_contiguous_masks() -> None:
    assert sad(A24.t(), B24.t()).total == 4
    assert sad(A24[:, ::2], B24[:, ::2]).total == 2  # columns 0, 2: only (0,2) and (1,2) differ


def test_empty_inputs_give_zero_fraction() -> None:
    r = sad({}, {})
    assert (r.per_layer, r.total, r.numel, r.fraction) == ({}, 0, 0, 0.0)
    z = torch.zeros(0, 4, dtype=torch.bool)
    r = sad(z, z)
    assert (r.total, r.numel, r.fraction) == (0, 0, 0.0)
    assert r.per_layer_fraction == {"": 0.0}
    r = sad({"e": z, "w": A24}, {"e": z, "w": B24})
    assert r.per_layer_fraction == {"e": 0.0, "w": 0.5}
    assert r.fraction == 0.5


def test_result_is_frozen() -> None:
    r = sad(A24, B24)
    with pytest.raises(AttributeError):
        r.total = 0  # type: ignore[misc]


def test_counts_are_python_ints() -> None:
    r = sad({"a": A24}, {"a": B24})
    assert type(r.total) is int
    assert type(r.per_layer["a"]) is int
    assert type(r.numel) is int
    assert type(r.fraction) is float


def test_large_counts_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(512, 1024, generator=g) < 0.5
    b = torch.rand(512, 1024, generator=g) < 0.5
    assert sad(a, b).total == int((a.numpy() != b.numpy()).sum())


# --------------------------------------------------------------------- property tests

same_shape_triples = array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6).flatmap(
    lambda s: st.tuples(arrays(np.bool_, s), arrays(np.bool_, s), arrays(np.bool_, s))
)


@settings(max_examples=200, deadline=None)
@given(same_shape_triples)
def test_metric_properties(triple: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    na, nb, nc = triple
    a, b, c = (torch.from_numpy(x.copy()) for x in triple)
    ab, ba, bc, ac = sad(a, b), sad(b, a), sad(b, c), sad(a, c)
    # Matches an independent numpy reference.
    assert ab.total == int((na != nb).sum())
    assert ab.numel == na.size
    assert ab == ba
    assert sad(a, a).total == 0
    assert ac.total <= ab.total + bc.total
    assert 0.0 <= ab.fraction <= 1.0
    if na.size:
        assert ab.fraction == ab.total / na.size
    else:
        assert ab.fraction == 0.0


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=5),
        array_shapes(min_dims=1, max_dims=2, max_side=5).flatmap(
            lambda s: st.tuples(arrays(np.bool_, s), arrays(np.bool_, s))
        ),
        max_size=4,
    )
)
def test_dict_total_is_sum_of_layers(layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    a = {k: torch.from_numpy(x.copy()) for k, (x, _) in layers.items()}
    b = {k: torch.from_numpy(y.copy()) for k, (_, y) in layers.items()}
    r = sad(a, b)
    for k, (x, y) in layers.items():
        assert r.per_layer[k] == sad(a[k], b[k]).total == int((x != y).sum())
        assert r.per_layer_numel[k] == x.size
    assert r.total == sum(r.per_layer.values())
    assert r.numel == sum(x.size for x, _ in layers.values())
    assert r.fraction == (r.total / r.numel if r.numel else 0.0)


# ----------------------------------------------------------------------------- errors


def test_error_non_bool_tensor() -> None:
    with pytest.raises(ValueError, match=r"tensor: a has dtype torch\.float32.*torch\.bool"):
        sad(A24.float(), B24)
    with pytest.raises(ValueError, match=r"tensor: b has dtype torch\.uint8.*torch\.bool"):
        sad(A24, B24.to(torch.uint8))


def test_error_non_bool_in_dict_names_layer() -> None:
    with pytest.raises(ValueError, match=r"layer 'fc2': b has dtype torch\.int64"):
        sad({"fc1": A24, "fc2": A24}, {"fc1": B24, "fc2": B24.long()})


def test_error_shape_mismatch_names_layer_and_shapes() -> None:
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for layer 'fc1': a has shape \(2, 4\) but b has shape \(4, 2\)",
    ):
        sad({"fc1": A24}, {"fc1": B24.t()})
    with pytest.raises(ValueError, match=r"shape mismatch for tensor: a has shape \(2, 4\)"):
        sad(A24, B24[:1])


def test_error_key_mismatch_names_missing_and_extra() -> None:
    with pytest.raises(
        ValueError, match=r"same layer names; missing from b: \['fc2'\]; extra in b: \['fc3'\]"
    ):
        sad({"fc1": A24, "fc2": A24}, {"fc1": B24, "fc3": B24})
    with pytest.raises(ValueError, match=r"missing from b: \[\]; extra in b: \['x'\]"):
        sad({}, {"x": A24})


def test_error_mixing_tensor_and_mapping() -> None:
    with pytest.raises(ValueError, match=r"cannot compare a Tensor with a dict.*two mappings"):
        sad(A24, {"": B24})
    with pytest.raises(ValueError, match=r"cannot compare a dict with a Tensor"):
        sad({"": A24}, B24)


def test_error_unsupported_types() -> None:
    with pytest.raises(TypeError, match=r"a is a list; expected a torch\.bool tensor"):
        sad([[True]], [[False]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layer 'w': b is a list"):
        sad({"w": A24}, {"w": [[True]]})  # type: ignore[dict-item]


@pytest.mark.cuda
def test_b_is_moved_to_a_device() -> None:
    r = sad({"w": A24.cuda()}, {"w": B24})
    assert r.total == 4
    assert sad(A24, B24.cuda()).total == 4


@pytest.mark.cuda
def test_tracker_follows_training_device() -> None:
    t = SADTracker(M0)  # reference masks start on the CPU
    row = t.record(1, {k: v.cuda() for k, v in M1.items()})
    assert (row["sad_prev_total"], row["sad_init_total"]) == (2, 2)
    sd = t.state_dict()
    assert all(v.is_cuda for part in ("initial", "previous") for v in sd[part].values())


# ---------------------------------------------------------------------------- tracker

# Scripted masks for two layers; 4 + 8 = 12 weights in total.
M0 = {"l1": m([[1, 1, 0, 0]]), "l2": m([[1, 1, 0, 0], [0, 0, 1, 1]])}
M1 = {"l1": m([[1, 0, 1, 0]]), "l2": m([[1, 1, 0, 0], [0, 0, 1, 1]])}
M2 = {"l1": m([[1, 1, 0, 0]]), "l2": m([[0, 1, 1, 0], [0, 0, 1, 1]])}
M3 = {"l1": m([[0, 0, 1, 1]]), "l2": m([[0, 1, 1, 0], [1, 1, 0, 0]])}

# Hand-computed (layer l1, layer l2) SADs.
EXPECTED = [
    # step, prev (l1, l2), init (l1, l2)
    (1, (2, 0), (2, 0)),  # M1 vs M0 (previous == initial before the first record)
    (2, (2, 2), (0, 2)),  # M2 vs M1 / M0
    (3, (4, 4), (4, 6)),  # M3 vs M2 / M0
]


def clone(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.items()}


def test_tracker_scripted_sequence() -> None:
    t = SADTracker(clone(M0))
    rows = [
        t.record(s, masks, epoch=s // 2) for s, masks in zip((1, 2, 3), (M1, M2, M3), strict=True)
    ]
    assert rows == t.history
    assert len(rows) == 3
    for row, (step, (p1, p2), (i1, i2)) in zip(rows, EXPECTED, strict=True):
        assert row["step"] == step
        assert row["epoch"] == step // 2
        assert row["sad_prev/l1"] == p1
        assert row["sad_prev/l2"] == p2
        assert row["sad_init/l1"] == i1
        assert row["sad_init/l2"] == i2
        assert row["sad_prev_total"] == p1 + p2
        assert row["sad_init_total"] == i1 + i2
        assert row["sad_prev_frac"] == (p1 + p2) / 12
        assert row["sad_init_frac"] == (i1 + i2) / 12


def test_tracker_key_scheme() -> None:
    t = SADTracker(M0)
    row = t.record(5, M1)
    expected = [
        "step",
        "epoch",
        "sad_prev_total",
        "sad_prev_frac",
        "sad_init_total",
        "sad_init_frac",
        "sad_prev/l1",
        "sad_prev/l2",
        "sad_init/l1",
        "sad_init/l2",
    ]
    assert list(row) == expected
    assert t.columns() == expected
    assert t.layer_names == ("l1", "l2")
    assert row["epoch"] is None


def test_tracker_returned_rows_are_copies() -> None:
    t = SADTracker(M0)
    row = t.record(1, M1)
    row["step"] = 99
    t.history[0]["step"] = 98
    assert t.history[0]["step"] == 1


def test_tracker_to_dict() -> None:
    t = SADTracker(M0)
    assert t.to_dict() == {c: [] for c in t.columns()}
    for s, masks in zip((1, 2, 3), (M1, M2, M3), strict=True):
        t.record(s, masks)
    cols = t.to_dict()
    assert list(cols) == t.columns()
    assert cols["step"] == [1, 2, 3]
    assert cols["epoch"] == [None, None, None]
    assert cols["sad_prev_total"] == [2, 4, 8]
    assert cols["sad_init_total"] == [2, 2, 10]
    assert cols["sad_init/l2"] == [0, 2, 6]


def test_tracker_clones_initial_and_previous() -> None:
    w = A24.clone()
    masks = {"w": w}
    t = SADTracker(masks)
    w.logical_not_()  # in-place, like the library's mask buffers
    row = t.record(1, masks)
    assert row["sad_init_total"] == 8  # compared against the original, not the alias
    assert row["sad_prev_total"] == 8
    w[0, 0] = ~w[0, 0]  # flip one more position in place
    row = t.record(2, masks)
    assert row["sad_prev_total"] == 1  # previous is the snapshot taken at step 1
    assert row["sad_init_total"] == 7


def test_tracker_callable_source() -> None:
    class Handle:
        def __init__(self) -> None:
            self.buf = {"w": A24.clone()}
            self.calls = 0

        def masks(self) -> dict[str, torch.Tensor]:
            self.calls += 1
            return self.buf  # same tensors every time, updated in place

    h = Handle()
    t = SADTracker(h.masks)
    assert h.calls == 1
    h.buf["w"][0, 0] = False
    assert t.record(1)["sad_prev_total"] == 1
    assert h.calls == 2
    h.buf["w"][1, 3] = False
    row = t.record(2, epoch=0)
    assert (row["sad_prev_total"], row["sad_init_total"], row["epoch"]) == (1, 2, 0)
    # Explicit masks win over the source.
    row = t.record(3, {"w": A24})
    assert (row["sad_prev_total"], row["sad_init_total"]) == (2, 0)
    assert h.calls == 3


def test_tracker_errors() -> None:
    t = SADTracker(M0)
    with pytest.raises(ValueError, match=r"record\(\) got no masks.*no mask source"):
        t.record(1)
    with pytest.raises(
        ValueError,
        match=r"missing from recorded masks: \[\]; extra in recorded masks: \['l3'\]",
    ):
        t.record(1, {**M1, "l3": A24})
    with pytest.raises(
        ValueError, match=r"missing from recorded masks: \['l2'\]; extra in recorded masks: \[\]"
    ):
        t.record(1, {"l1": M1["l1"]})
    with pytest.raises(ValueError, match=r"layer 'l1': recorded masks has dtype torch\.float32"):
        t.record(1, {**M1, "l1": M1["l1"].float()})
    with pytest.raises(ValueError, match=r"shape mismatch for layer 'l2'"):
        t.record(1, {**M1, "l2": M1["l2"].t()})
    with pytest.raises(TypeError, match=r"record\(\) needs masks as a mapping"):
        t.record(1, A24)  # type: ignore[arg-type]
    assert t.history == []  # failed records store nothing
    with pytest.raises(ValueError, match=r"layer 'w': initial masks has dtype torch\.float32"):
        SADTracker({"w": A24.float()})
    with pytest.raises(TypeError, match=r"mapping \{name: torch\.bool tensor\} or a callable"):
        SADTracker(A24)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mask source returned a Tensor"):
        SADTracker(lambda: A24)  # type: ignore[arg-type,return-value]


def test_tracker_one_host_sync_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    t = SADTracker(M0)
    calls: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *args, _orig=orig, _name=name, **kwargs):
            calls.append(_name)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    t.record(1, M1)
    t.record(2, M2)
    assert calls == ["tolist", "tolist"]


def test_tracker_csv_round_trip(tmp_path) -> None:
    t = SADTracker(M0)
    t.record(1, M1, epoch=0)
    t.record(2, M2)
    t.record(3, M3, epoch=1)
    path = tmp_path / "sad.csv"
    path.write_text("stale\n")
    t.to_csv(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == t.columns()
        rows = list(reader)
    assert len(rows) == 3
    for got, want in zip(rows, t.history, strict=True):
        assert got["epoch"] == ("" if want["epoch"] is None else str(want["epoch"]))
        for k, v in want.items():
            if k == "epoch":
                continue
            if k.endswith("_frac"):
                assert float(got[k]) == v  # exact: floats are written with repr
            else:
                assert int(got[k]) == v
    assert os.listdir(tmp_path) == ["sad.csv"]  # no temp file left behind


def test_tracker_csv_empty_history_writes_header(tmp_path) -> None:
    t = SADTracker(M0)
    path = tmp_path / "empty.csv"
    t.to_csv(str(path))
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [t.columns()]


def test_tracker_csv_is_atomic(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = SADTracker(M0)
    t.record(1, M1)
    path = tmp_path / "sad.csv"
    path.write_text("old content\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        t.to_csv(path)
    assert path.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["sad.csv"]


def _mask_sequence(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        {"a": torch.rand(4, 8, generator=g) < 0.5, "b": torch.rand(3, 4, generator=g) < 0.5}
        for _ in range(n)
    ]


def test_tracker_state_dict_resume_matches_uninterrupted(tmp_path) -> None:
    seq = _mask_sequence(7)

    full = SADTracker(seq[0])
    for step in range(1, 7):
        full.record(step, seq[step], epoch=step // 3)

    first = SADTracker(seq[0])
    for step in range(1, 4):
        first.record(step, seq[step], epoch=step // 3)
    path = tmp_path / "tracker.pt"
    torch.save(first.state_dict(), path)
    del first

    state = torch.load(path, weights_only=True)
    resumed = SADTracker(seq[3])  # a fresh run starts from the checkpointed model's masks
    resumed.load_state_dict(state)
    for step in range(4, 7):
        resumed.record(step, seq[step], epoch=step // 3)
    assert resumed.history == full.history
    assert resumed.to_dict() == full.to_dict()

    # Sanity: without the state the resumed run would disagree, so the test can fail.
    naive = SADTracker(seq[3])
    for step in range(4, 7):
        naive.record(step, seq[step], epoch=step // 3)
    assert naive.history != full.history[3:]


def test_state_dict_contents_are_private_and_plain() -> None:
    t = SADTracker(M0)
    t.record(1, M1, epoch=2)
    sd = t.state_dict()
    assert sd["layers"] == ["l1", "l2"]
    assert sd["initial"]["l1"].dtype == torch.bool
    assert torch.equal(sd["previous"]["l1"], M1["l1"])
    sd["initial"]["l1"].logical_not_()  # mutating the returned state must not leak back
    sd["history"][0]["step"] = -1
    assert t.record(2, M0)["sad_init_total"] == 0
    assert t.history[0]["step"] == 1


def test_load_state_dict_errors_leave_tracker_unchanged() -> None:
    src = SADTracker(M0)
    src.record(1, M1)
    good = src.state_dict()

    t = SADTracker(M0)
    t.record(7, M2)
    before = t.state_dict()

    other = SADTracker({"x": A24})
    with pytest.raises(ValueError, match=r"state tracks layers \['l1', 'l2'\] .* \['x'\]"):
        other.load_state_dict(good)
    with pytest.raises(ValueError, match=r"missing keys \['history'\]"):
        t.load_state_dict({k: v for k, v in good.items() if k != "history"})
    with pytest.raises(ValueError, match=r"unsupported SADTracker state version 99"):
        t.load_state_dict({**good, "version": 99})
    bad = {**good, "previous": {**good["previous"], "l2": good["previous"]["l2"].float()}}
    with pytest.raises(ValueError, match=r"layer 'l2': state 'previous' has dtype torch\.float32"):
        t.load_state_dict(bad)
    bad = {**good, "initial": {**good["initial"], "l1": torch.zeros(2, 2, dtype=torch.bool)}}
    with pytest.raises(ValueError, match=r"shape mismatch for layer 'l1': state 'initial'"):
        t.load_state_dict(bad)
    bad = {**good, "history": [{"step": 1}]}
    with pytest.raises(ValueError, match=r"state history row 0 has keys"):
        t.load_state_dict(bad)

    after = t.state_dict()
    assert after["history"] == before["history"]
    for part in ("initial", "previous"):
        for k in ("l1", "l2"):
            assert torch.equal(after[part][k], before[part][k])


def test_fraction_maths_in_tracker_with_uneven_layers() -> None:
    init = {
        "big": torch.zeros(10, 10, dtype=torch.bool),
        "small": torch.zeros(1, 4, dtype=torch.bool),
    }
    cur = {"big": init["big"].clone(), "small": torch.ones(1, 4, dtype=torch.bool)}
    cur["big"][0, :3] = True
    row = SADTracker(init).record(0, cur)
    # Totals are pooled over all weights, not averaged over layers.
    assert row["sad_init_total"] == 7
    assert row["sad_init_frac"] == 7 / 104
    assert not math.isclose(row["sad_init_frac"], (3 / 100 + 4 / 4) / 2)
