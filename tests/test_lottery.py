"""Lottery-ticket harness: IMP schedules, the arms' masks, and the verdict rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmsparse.app.lottery import (
    ARMS,
    TicketSetting,
    harness,
    imp_patterns,
    judge,
    run_setting,
    verdict_table,
)
from nmsparse.patterns import NM, Unstructured


def test_imp_patterns():
    assert imp_patterns("unstructured:0.125", 3) == [Unstructured(0.5), Unstructured(0.25),
                                                      Unstructured(0.125)]
    # 8 * 0.25 ** (1/3) = 5.04, 8 * 0.25 ** (2/3) = 3.17
    assert imp_patterns("2:8", 3) == [NM(5, 8), NM(3, 8), NM(2, 8)]
    assert imp_patterns("1:4", 5) == [NM(3, 4), NM(2, 4), NM(1, 4)]
    with pytest.raises(ValueError, match="unstructured or N:M"):
        TicketSetting("block:2x2:0.5", lr=0.1, epochs=1)


def test_judge_needs_a_margin_over_both_controls():
    runs = [{"imp_rewind": 0.80, "random_reinit": 0.75, "random_mask": 0.70},
            {"imp_rewind": 0.82, "random_reinit": 0.76, "random_mask": 0.71}]
    assert judge(runs).exists
    close = [{"imp_rewind": 0.80, "random_reinit": 0.79, "random_mask": 0.70},
             {"imp_rewind": 0.82, "random_reinit": 0.83, "random_mask": 0.71}]
    verdict = judge(close)
    assert not verdict.exists and "does not beat random_reinit" in verdict.reason
    assert judge([{"imp_rewind": 0.80, "random_reinit": 0.796, "random_mask": 0.7}]).exists \
        is False


def blobs(seed=0, n=240):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=generator) * 2
    y = torch.randint(0, 4, (n,), generator=generator)
    return centres[y] + torch.randn(n, 16, generator=generator), y


def make_model():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("pattern", ["unstructured:0.25", "1:4"])
def test_every_arm_runs_with_masks_of_the_pattern(pattern, monkeypatch):
    x, y = blobs()
    data = {"x_train": x[:160], "y_train": y[:160], "x_test": x[160:], "y_test": y[160:]}
    seen = []
    original = harness._train_masked

    def spy(make, state, pat, masks, batches, setting):
        seen.append((pat, {k: v.clone() for k, v in masks.items()}, state))
        return original(make, state, pat, masks, batches, setting)

    monkeypatch.setattr(harness, "_train_masked", spy)
    setting = TicketSetting(pattern, lr=0.05, epochs=2, rounds=2, batch_size=32)
    results = run_setting(make_model, data, setting, seed=0)
    assert list(results) == list(ARMS) and all(0 <= v <= 1 for v in results.values())
    # trainings: one-shot, fine-tune, IMP round 1, IMP round 2, re-init, random mask
    oneshot, finetune, imp1, imp2, reinit, random_mask = seen
    for pat, masks, _ in seen:
        assert all(pat.violations(m).ok for m in masks.values())
    assert all(torch.equal(imp2[1][k] & ~imp1[1][k], torch.zeros_like(imp1[1][k]))
               for k in imp1[1])  # IMP only prunes further
    assert all(torch.equal(reinit[1][k], imp2[1][k]) for k in imp2[1])
    assert not torch.equal(reinit[2]["0.weight"], imp2[2]["0.weight"])  # fresh init
    assert torch.equal(random_mask[2]["0.weight"], imp2[2]["0.weight"])  # same init
    assert any(not torch.equal(random_mask[1][k], imp2[1][k]) for k in imp2[1])
    assert torch.equal(oneshot[1]["0.weight"], finetune[1]["0.weight"])
    assert not torch.equal(oneshot[2]["0.weight"], finetune[2]["0.weight"])  # rewound vs trained
    table = verdict_table({"tiny": [results]})
    assert table.startswith("| setting") and "tiny" in table


@pytest.mark.parametrize("rewind_steps", [0, 2])
def test_imp_rewinds_to_the_dense_runs_weights_at_step_k(rewind_steps, monkeypatch):
    # Frankle et al. 2020 rewind the ticket to the dense run's weights after k steps (k = 0:
    # the initialisation, Frankle & Carbin 2019): replay the dense run by hand to step k and
    # check that every rewound arm starts from exactly those weights.
    x, y = blobs()
    data = {"x_train": x[:160], "y_train": y[:160], "x_test": x[160:], "y_test": y[160:]}
    setting = TicketSetting("unstructured:0.25", lr=0.1, epochs=1, rounds=2, batch_size=40,
                            rewind_steps=rewind_steps)
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(160, generator=generator)
    expected = make_model()
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9)
    for idx in list(order.split(40))[:rewind_steps]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(expected(x[idx]), y[idx]).backward()
        optimizer.step()
    starts = []
    original = harness._train_masked

    def spy(make_model_, state, pattern, masks, batches, setting_):
        starts.append({k: v.clone() for k, v in state.items()})
        return original(make_model_, state, pattern, masks, batches, setting_)

    monkeypatch.setattr(harness, "_train_masked", spy)
    run_setting(make_model, data, setting, seed=3)
    # oneshot_rewind, prune_finetune (trained weights), 2 IMP rounds, random_reinit, random_mask
    rewound = [starts[0], starts[2], starts[3], starts[5]]
    for state in rewound:
        for name, value in expected.state_dict().items():
            assert torch.equal(state[name], value), name
    with pytest.raises(ValueError, match="past the dense run"):
        run_setting(make_model, data, TicketSetting("unstructured:0.25", lr=0.1, epochs=1,
                                                    batch_size=40, rewind_steps=99), seed=3)
